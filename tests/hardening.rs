//! What outside testing broke, each against the real server over loopback:
//! TLS handshakes starved by silent sockets, errors that grew with the input,
//! listeners without inbound protection or HTTP/2 limits, a dropped
//! downstream connection misclassified, and smaller truths (ranges, page
//! tokens, an optional component's NOT_FOUND).

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bfb::{
    component::Component,
    pb::bfb::{
        activity::v1::{StreamUserActivityRequest, UserRange, stream_user_activity_request::Users},
        admin::v1::{InvalidateEntityRequest, cache_admin_client::CacheAdminClient},
        common::v1::{Completeness, ComponentState},
        customer::{
            v1::{
                BatchGetCustomersRequest, GetCustomerRequest,
                customer_aggregate_service_client::CustomerAggregateServiceClient,
            },
            v2::{
                self, PageRequest,
                customer_aggregate_service_client::CustomerAggregateServiceClient as V2,
            },
        },
        sim::v1::Behavior,
    },
    sim::SimConfig,
};
use common::{
    mask, sample, start,
    tls::{Ca, get, mtls_harness_with, spiffe, temp_dir, tls_channel},
};
use tokio::{io::AsyncReadExt, net::TcpStream, sync::watch};
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt;

/// The size of an error as it travels: `grpc-message` percent-encoded (at
/// worst 3 bytes a byte) and `grpc-status-details-bin` base64-encoded.
fn wire_size(status: &tonic::Status) -> usize {
    status.message().len() * 3 + status.details().len().div_ceil(3) * 4
}

/// Waits (bounded) until the metrics show `series` at `value`.
async fn until_metric(h: &common::Harness, series: &str, check: impl Fn(f64) -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let text = h.metrics_text().await;
        if common::metric(&text, series).is_some_and(&check) {
            return;
        }
        assert!(
            Instant::now() < until,
            "{series} never got there: {:?}",
            common::metric(&text, series)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `n` sockets to `addr` that connect and say nothing; with `reopen`, each
/// is reopened as soon as bfb closes it. All close when `stop` says so.
/// Returns once all `n` are connected.
async fn silent_sockets(
    addr: std::net::SocketAddr,
    n: usize,
    reopen: bool,
    stop: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let opened = Arc::new(AtomicUsize::new(0));
    let tasks = (0..n)
        .map(|_| {
            let (mut stop, opened) = (stop.clone(), opened.clone());
            tokio::spawn(async move {
                loop {
                    let Ok(mut socket) = TcpStream::connect(addr).await else {
                        tokio::task::yield_now().await;
                        continue;
                    };
                    opened.fetch_add(1, Ordering::Relaxed);
                    let mut byte = [0u8; 1];
                    tokio::select! {
                        _ = socket.read(&mut byte), if reopen => {}
                        _ = stop.changed() => return,
                    }
                }
            })
        })
        .collect();
    let until = Instant::now() + Duration::from_secs(30);
    while opened.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < until,
            "the silent sockets never all opened"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tasks
}

/// GetCustomer over a new mTLS connection, within 1 s.
async fn served_at_once(h: &common::Harness, ca: &Ca, who: &common::tls::Leaf) {
    tokio::time::timeout(Duration::from_secs(1), async {
        let channel = tls_channel(h.bfb, &ca.pem(), Some(who))
            .await
            .expect("handshake");
        CustomerAggregateServiceClient::new(channel)
            .get_customer(get("c-1", &["profile"]))
            .await
            .expect("served")
    })
    .await
    .expect("a real client is not locked out by silent sockets");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_cannot_starve_tls_handshakes() {
    let dir = temp_dir("starve");
    let ca = Ca::new("test ca");
    let h = mtls_harness_with(&dir, &ca, &ca.leaf(&[], false), |_| {}).await;
    let reports = ca.leaf(&[&spiffe("ns/reports/sa/report")], false);

    // 2,000 silent sockets, reopened whenever bfb closes one.
    let (stop, stopped) = watch::channel(false);
    let attackers = silent_sockets(h.bfb, 2_000, true, &stopped).await;
    // Far more than the 256 that locked everyone out before.
    until_metric(&h, "bfb_tls_handshakes_in_progress", |n| n >= 1_000.0).await;
    for _ in 0..3 {
        served_at_once(&h, &ca, &reports).await;
    }
    let _ = stop.send(true);
    for a in attackers {
        a.await.expect("attacker");
    }
    until_metric(&h, "bfb_tls_handshakes_in_progress", |n| n == 0.0).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_over_the_cap_are_shed_oldest_first() {
    const CAP: usize = 100;
    let dir = temp_dir("shed");
    let ca = Ca::new("test ca");
    let h = mtls_harness_with(&dir, &ca, &ca.leaf(&[], false), |c| {
        if let Some(tls) = c.tls.as_mut() {
            tls.max_pending_connections = CAP;
        }
    })
    .await;
    let reports = ca.leaf(&[&spiffe("ns/reports/sa/report")], false);
    let (stop, stopped) = watch::channel(false);
    let attackers = silent_sockets(h.bfb, 3 * CAP, false, &stopped).await;
    // Not every socket a client sees connected is accepted: a silent client
    // whose handshake ACK met a full accept queue never exists on bfb's
    // side. At least a cap's worth beyond the cap is.
    until_metric(
        &h,
        r#"bfb_tls_handshakes_dropped_total{reason="shed"}"#,
        |n| n >= CAP as f64,
    )
    .await;
    // Memory stays bounded: a shed socket is closed when the accept loop
    // next reaps it, and then at most the cap is held.
    until_metric(&h, "bfb_tls_handshakes_in_progress", |n| n <= CAP as f64).await;
    // The newest silent sockets hold the room; a real client still gets in.
    served_at_once(&h, &ca, &reports).await;
    let _ = stop.send(true);
    for a in attackers {
        a.await.expect("attacker");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_stay_small_whatever_the_input() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = h.customers().await;
    let long = "x".repeat(10_000);
    let many: Vec<&str> = vec!["x"; 3_000];
    let cases = [
        ("one long path", mask(&[&long])),
        ("3,000 paths", mask(&many)),
    ];
    for (what, read_mask) in cases {
        let status = client
            .get_customer(GetCustomerRequest {
                customer_id: "c-1".into(),
                read_mask,
                ..Default::default()
            })
            .await
            .expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}");
        assert!(
            wire_size(&status) < 4096,
            "{what}: {} bytes",
            wire_size(&status)
        );
        let bad = status.get_details_bad_request().expect("field violations");
        assert!(
            (1..=11).contains(&bad.field_violations.len()),
            "{what}: {}",
            bad.field_violations.len()
        );
        assert_eq!(bad.field_violations[0].field, "read_mask.paths[0]");
    }
    let ids: Vec<String> = (0..100).map(|i| format!("{i:0>65}")).collect();
    let status = client
        .batch_get_customers(BatchGetCustomersRequest {
            customer_ids: ids,
            ..Default::default()
        })
        .await
        .expect_err("ids too long");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(wire_size(&status) < 4096, "{} bytes", wire_size(&status));
    let bad = status.get_details_bad_request().expect("field violations");
    assert_eq!(
        bad.field_violations.last().map(|v| v.description.as_str()),
        Some("and 90 more problems not listed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_has_the_same_inbound_protection() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut admin = CacheAdminClient::new(common::channel(h.admin).await);
    let status = admin
        .invalidate_entity(InvalidateEntityRequest {
            entity_id: "c".repeat(200_000),
            components: Vec::new(),
        })
        .await
        .expect_err("over server.max_request_bytes");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // And it answers health, like every listener.
    let health = HealthClient::new(common::channel(h.admin).await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health on the admin listener");
    assert_eq!(health.into_inner().status, 1);
}

/// A raw HTTP/2 gRPC request for `path` with an empty message.
fn grpc_request(addr: std::net::SocketAddr, path: &str) -> http::Request<()> {
    http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request")
}

/// Opens a Watch stream on `client`; returns its response's headers.
async fn watch_stream(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    addr: std::net::SocketAddr,
) -> (
    http::response::Parts,
    h2::RecvStream,
    h2::SendStream<bytes::Bytes>,
) {
    let ready = client.clone().ready().await.expect("ready");
    *client = ready;
    let (response, mut send) = client
        .send_request(grpc_request(addr, "/grpc.health.v1.Health/Watch"), false)
        .expect("send");
    // An empty HealthCheckRequest (the length-prefixed empty message), and
    // the end of the request: tonic reads a unary request to its end. A
    // watch over the cap may already be answered and its stream reset
    // (RST_STREAM NO_ERROR: the body is not needed); the response says how
    // it went, so a refused send is no failure here.
    let _ = send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true);
    let (parts, body) = response.await.expect("response").into_parts();
    (parts, body, send)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listener_sets_http2_limits_and_health_watches_are_capped() {
    let h = start(SimConfig::default(), |c| {
        c.server.max_concurrent_streams = 16;
        c.server.max_health_watches = 4;
    })
    .await;
    // One watch on each listener, kept open.
    let mut open = Vec::new();
    for (name, addr) in [("public", h.bfb), ("admin", h.admin), ("health", h.health)] {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2");
        tokio::spawn(connection);
        // One answered call: bfb's SETTINGS have been read by then.
        let (parts, body, send) = watch_stream(&mut client, addr).await;
        assert_eq!(parts.status, 200, "{name}");
        assert_eq!(
            client.current_max_send_streams(),
            16,
            "{name}: MAX_CONCURRENT_STREAMS from [server]"
        );
        open.push((client, body, send));
    }
    // Counted over all listeners: one more fits.
    until_metric(&h, "bfb_health_watches", |n| n == 3.0).await;

    let tcp = TcpStream::connect(h.health).await.expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2");
    let connection = tokio::spawn(connection);
    let (parts, _body, _send) = watch_stream(&mut client, h.health).await;
    assert_eq!(parts.status, 200);
    assert!(parts.headers.get("grpc-status").is_none(), "a live stream");
    let (refused, _, _) = watch_stream(&mut client, h.health).await;
    assert_eq!(
        refused
            .headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()),
        Some("8"),
        "over server.max_health_watches: RESOURCE_EXHAUSTED"
    );
    until_metric(&h, "bfb_health_watches", |n| n == 4.0).await;
    drop((client, _body, _send));
    connection.abort();
    until_metric(&h, "bfb_health_watches", |n| n == 3.0).await;
    drop(open);
    until_metric(&h, "bfb_health_watches", |n| n == 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_killed_mid_call_is_unavailable_and_retried() {
    let (mut orders, addr) = common::sim_process(
        "127.0.0.1:0",
        &["--services", "orders", "--latency", "500ms"],
    )
    .await;
    let h = start(SimConfig::default(), |c| {
        let o = c.downstream_mut(Component::Orders).expect("orders");
        o.endpoint = format!("http://{addr}");
        o.connect_timeout = Duration::from_millis(200);
    })
    .await;
    let mut client = h.customers().await;
    let call = tokio::spawn(async move {
        client
            .get_customer(GetCustomerRequest {
                customer_id: "c-1".into(),
                read_mask: mask(&["profile", "orders"]),
                ..Default::default()
            })
            .await
    });
    common::until_sim(addr, "the call in flight at orders", |s| {
        s.services["orders"].in_flight >= 1
    })
    .await;
    orders.kill().await.expect("kill -9");
    let answer = call.await.expect("join").expect("best effort").into_inner();
    let status = answer.status.expect("status");
    assert_eq!(status.components["profile"].reason, "OK");
    assert_eq!(
        status.components["orders"].reason, "UNAVAILABLE",
        "a dropped connection is a transport failure"
    );
    let text = h.metrics_text().await;
    assert!(
        sample(&text, r#"bfb_retries_total{downstream="orders"}"#) >= 1.0,
        "and it was retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quick_cancelled_or_deadline_exceeded_is_not_a_timeout() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut client = h.customers().await;
    for code in [Code::Cancelled, Code::DeadlineExceeded] {
        h.set_behavior(
            "orders",
            Behavior {
                error_rate: 1.0,
                error_code: code as i32,
                ..Default::default()
            },
        )
        .await;
        let answer = client
            .get_customer(GetCustomerRequest {
                customer_id: "c-1".into(),
                read_mask: mask(&["profile", "orders"]),
                ..Default::default()
            })
            .await
            .expect("best effort")
            .into_inner();
        assert_eq!(
            answer.status.expect("status").components["orders"].reason,
            "DOWNSTREAM_ERROR",
            "{code:?} at once, with time left"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_past_the_largest_number_is_refused_not_cut_short() {
    let h = start(SimConfig::default(), |_| {}).await;
    let status = h
        .activity()
        .await
        .stream_user_activity(StreamUserActivityRequest {
            users: Some(Users::UserRange(UserRange {
                prefix: "u-".into(),
                first: u64::MAX - 1,
                count: 3,
            })),
            ..Default::default()
        })
        .await
        .expect_err("overflowing range");
    assert_eq!(status.code(), Code::InvalidArgument);
    let bad = status.get_details_bad_request().expect("violations");
    assert_eq!(bad.field_violations[0].field, "user_range");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_token_belongs_to_its_customer_and_list() {
    let h = start(SimConfig::default(), |_| {}).await;
    let mut v2 = V2::new(common::channel(h.bfb).await);
    let page = |id: &str, token: &str| v2::GetCustomerRequest {
        customer_id: id.into(),
        read_mask: mask(&["orders"]),
        orders_page: Some(PageRequest {
            page_size: 1,
            page_token: token.into(),
        }),
        ..Default::default()
    };
    let mut token = String::new();
    for n in 1..200 {
        let c = v2
            .get_customer(page(&format!("c-{n}"), ""))
            .await
            .expect("ok")
            .into_inner();
        let next = c.customer.and_then(|c| c.orders).map(|o| o.next_page_token);
        if let Some(next) = next.filter(|t| !t.is_empty()) {
            token = next;
            let own = v2
                .get_customer(page(&format!("c-{n}"), &token))
                .await
                .expect("its own token walks on");
            assert!(own.into_inner().customer.and_then(|c| c.orders).is_some());
            let other = format!("c-{}", n + 1);
            let status = v2
                .get_customer(page(&other, &token))
                .await
                .expect_err("another customer's token");
            assert_eq!(status.code(), Code::InvalidArgument);
            let bad = status.get_details_bad_request().expect("violations");
            assert_eq!(bad.field_violations[0].field, "orders_page.page_token");
            break;
        }
    }
    assert!(!token.is_empty(), "no customer with two orders");
    assert!(
        !token.contains(
            &"orders"
                .bytes()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ),
        "opaque: {token}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_optional_components_not_found_is_its_own_not_the_customers() {
    let h = start(SimConfig::default(), |_| {}).await;
    h.set_behavior(
        "orders",
        Behavior {
            error_rate: 1.0,
            error_code: Code::NotFound as i32,
            ..Default::default()
        },
    )
    .await;
    let mut client = h.customers().await;
    let request = |completeness: Completeness| GetCustomerRequest {
        customer_id: "c-1".into(),
        completeness: completeness as i32,
        ..Default::default()
    };
    let answer = client
        .get_customer(request(Completeness::BestEffort))
        .await
        .expect("the profile exists: the customer does")
        .into_inner();
    let status = answer.status.expect("status");
    assert!(status.degraded);
    assert_eq!(status.components["orders"].reason, "NOT_FOUND");
    assert_eq!(
        status.components["orders"].state,
        ComponentState::Error as i32
    );
    assert!(answer.customer.and_then(|c| c.profile).is_some());

    let all = client
        .get_customer(request(Completeness::All))
        .await
        .expect_err("orders is needed");
    assert_eq!(all.code(), Code::NotFound);
    let info = all.get_details_error_info().expect("error info");
    assert_eq!(info.reason, "NOT_FOUND");
    assert_eq!(info.metadata["component"], "orders");

    // The profile still decides: an unknown customer is CUSTOMER_NOT_FOUND.
    let missing = client
        .get_customer(GetCustomerRequest {
            customer_id: "c-999999999".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown");
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(
        missing.get_details_error_info().expect("info").reason,
        "CUSTOMER_NOT_FOUND"
    );
}
