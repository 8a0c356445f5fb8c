//! Observability and lifecycle over real gRPC: Prometheus metrics (checked
//! with the real `promtool`), request ids and trace context propagated to
//! downstream calls, readiness through a SIGTERM drain with calls in flight,
//! and the span tree received by a real OTLP/gRPC receiver.

mod common;

use common::{http_get, sample};

use std::{net::SocketAddr, process::Stdio, time::Duration};

use bfb::{
    pb::bfb::{
        common::v1::Completeness,
        customer::v1::{
            GetCustomerRequest, customer_aggregate_service_client::CustomerAggregateServiceClient,
        },
        sim::v1::Behavior,
    },
    sim::{self, SimConfig},
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, any_value::Value},
    trace::v1::Span,
};
use tokio::{io::AsyncWriteExt, net::TcpListener, process::Child};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// The value of a series in an exposition taken before the calls: a counter
/// that has not moved yet may be absent (0). Readings after the calls use
/// [`sample`], which fails on a missing series.
fn sample_before(text: &str, series: &str) -> f64 {
    common::metric(text, series).unwrap_or(0.0)
}

fn get(id: &str) -> GetCustomerRequest {
    GetCustomerRequest {
        customer_id: id.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_and_pass_promtool() {
    let h = common::start(SimConfig::default(), |_| {}).await;
    let before = http_get(h.metrics, "/metrics").await;
    let mut client = h.customers().await;
    for _ in 0..3 {
        client.get_customer(get("c-1")).await.expect("ok");
    }
    h.set_behavior(
        "orders",
        Behavior {
            error_rate: 1.0,
            ..Default::default()
        },
    )
    .await;
    client
        .get_customer(get("c-1"))
        .await
        .expect("degraded but ok");
    client
        .get_customer(GetCustomerRequest {
            completeness: Completeness::All as i32,
            ..get("c-1")
        })
        .await
        .expect_err("all");
    let after = http_get(h.metrics, "/metrics").await;

    let delta = |series: &str| sample(&after, series) - sample_before(&before, series);
    assert_eq!(
        delta(r#"bfb_rpc_duration_seconds_count{method="GetCustomer",code="OK"}"#),
        4.0
    );
    assert_eq!(
        delta(r#"bfb_rpc_duration_seconds_count{method="GetCustomer",code="UNAVAILABLE"}"#),
        1.0
    );
    assert!(
        delta(r#"bfb_downstream_duration_seconds_count{downstream="profile",code="OK"}"#) >= 5.0
    );
    assert!(
        delta(r#"bfb_downstream_duration_seconds_count{downstream="orders",code="UNAVAILABLE"}"#)
            >= 2.0
    );
    assert_eq!(
        delta(r#"bfb_degraded_responses_total{component="orders",reason="UNAVAILABLE"}"#),
        1.0
    );
    assert!(
        delta(r#"bfb_retries_total{downstream="orders"}"#) >= 1.0,
        "UNAVAILABLE is retried"
    );
    assert_eq!(
        delta(r#"bfb_fanout_components_count{method="GetCustomer"}"#),
        4.0
    );
    assert_eq!(
        sample(&after, r#"bfb_breaker_state{downstream="orders"}"#),
        0.0
    );
    assert_eq!(
        sample(&after, r#"bfb_bulkhead_in_use{downstream="orders"}"#),
        0.0
    );
    assert!(after.contains("# TYPE bfb_load_shed_total counter"));
    assert!(!after.contains("c-1"), "no ids in labels");

    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut check = tokio::process::Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {promtool} (make test installs it): {e}"));
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(after.as_bytes())
        .await
        .expect("write");
    let out = check.wait_with_output().await.expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn request_ids_and_only_allowed_metadata_reach_downstream() {
    let h = common::start(SimConfig::default(), |_| {}).await;
    let mut client = h.customers().await;
    let mut req = tonic::Request::new(get("c-1"));
    req.metadata_mut()
        .insert("x-request-id", "req-42".parse().expect("ascii"));
    req.metadata_mut()
        .insert("authorization", "Bearer secret".parse().expect("ascii"));
    req.metadata_mut()
        .insert("x-tenant", "acme".parse().expect("ascii"));
    let resp = client.get_customer(req).await.expect("ok");
    assert_eq!(
        resp.metadata().get("x-request-id").expect("returned"),
        "req-42"
    );
    let seen = h.service_stats("orders").await.last_metadata;
    assert_eq!(seen.get("x-request-id").map(String::as_str), Some("req-42"));
    assert!(!seen.contains_key("authorization"), "{seen:?}");
    assert!(!seen.contains_key("x-tenant"), "{seen:?}");

    // Errors carry it too; without one, bfb makes one up.
    let err = client.get_customer(get("")).await.expect_err("invalid");
    let generated = err
        .metadata()
        .get("x-request-id")
        .expect("generated")
        .to_str()
        .expect("ascii");
    assert_eq!(generated.len(), 36);
}

/// An in-process sim on port 0; stops when the sender drops.
async fn start_sim(config: SimConfig) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(sim::serve(config, listener, async {
        let _ = rx.await;
    }));
    (addr, tx)
}

/// `bfb serve` as its own process on the example config, edited by `edit`.
async fn spawn_bfb(sim: SocketAddr, edit: impl FnOnce(String) -> String) -> (Child, SocketAddr) {
    let config = common::example_on_port_0("127.0.0.1:0")
        .replace("http://127.0.0.1:50061", &format!("http://{sim}"));
    let dir = std::env::temp_dir().join(format!("bfb-obs-{}-{}", std::process::id(), sim.port()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("bfb.toml");
    std::fs::write(&path, edit(config)).expect("write config");
    common::spawn_bfb_process(&["serve".as_ref(), "--config".as_ref(), path.as_os_str()]).await
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("running").to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(ok.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_readiness_first_and_finishes_calls_in_flight() {
    // Slow, but within the downstream timeout (1 s).
    let (sim, _sim_stop) = start_sim(common::sim_with_latency(Duration::from_millis(800))).await;
    let (mut bfb, addr) = spawn_bfb(sim, |c| {
        c.replace("drain_delay = \"5s\"", "drain_delay = \"300ms\"")
            .replace("shutdown_grace = \"20s\"", "shutdown_grace = \"60s\"")
    })
    .await;
    let channel = common::channel(addr).await;
    let mut health = HealthClient::new(channel.clone());
    let ready = |s: &str| HealthCheckRequest { service: s.into() };
    assert_eq!(
        health
            .check(ready("readiness"))
            .await
            .expect("check")
            .into_inner()
            .status,
        ServingStatus::Serving as i32
    );
    let mut watch = health
        .watch(ready("readiness"))
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("stream").expect("message");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let mut calls = Vec::new();
    for i in 0..5 {
        let mut c = CustomerAggregateServiceClient::new(common::channel(addr).await);
        calls.push(tokio::spawn(async move {
            c.get_customer(get(&format!("c-{}", i + 1))).await
        }));
    }
    // The signal comes once every call is in flight at the (slow) sim.
    common::until_sim(sim, "5 calls in flight", |s| {
        s.services["profile"].in_flight >= 5
    })
    .await;
    sigterm(&bfb);

    let next = watch.message().await.expect("stream").expect("message");
    assert_eq!(
        next.status,
        ServingStatus::NotServing as i32,
        "readiness drops at once"
    );
    // Liveness stays SERVING while draining.
    assert_eq!(
        health
            .check(ready(""))
            .await
            .expect("check")
            .into_inner()
            .status,
        ServingStatus::Serving as i32
    );
    // An open Watch stream holds its connection (shutdown waits for it, up to
    // the grace period); a well-behaved client closes it.
    drop(watch);
    drop(health);
    drop(channel);
    for call in calls {
        let resp = call.await.expect("join").expect("in-flight call completes");
        assert!(
            resp.into_inner()
                .customer
                .expect("customer")
                .profile
                .is_some()
        );
    }
    // It exits once the calls are done, long before the 60 s grace.
    let status = tokio::time::timeout(Duration::from_secs(30), bfb.wait())
        .await
        .expect("exits when in-flight work is done")
        .expect("status");
    assert!(status.success(), "{status:?}");
}

/// Collects every span exported to it.
struct Receiver(tokio::sync::mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn attr<'a>(span: &'a Span, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v: &AnyValue| v.value.as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_receiver_as_one_tree_and_trace_context_goes_downstream() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let otlp = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(tx)))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let (sim, _sim_stop) = start_sim(SimConfig::default()).await;
    let (mut bfb, addr) = spawn_bfb(sim, |c| {
        c.replace(
            "# otlp_endpoint = \"http://127.0.0.1:4317\"",
            &format!("otlp_endpoint = \"http://{otlp}\""),
        )
        .replace("drain_delay = \"5s\"", "drain_delay = \"0s\"")
        .replace(
            "# \"deployment.environment\" = \"dev\"",
            "\"deployment.environment\" = \"test\"",
        )
    })
    .await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let mut req = tonic::Request::new(get("c-3"));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01")
            .parse()
            .expect("ascii"),
    );
    let mut client = CustomerAggregateServiceClient::new(common::channel(addr).await);
    client.get_customer(req).await.expect("ok");
    let stats = bfb::pb::bfb::sim::v1::sim_control_client::SimControlClient::new(
        common::channel(sim).await,
    )
    .get_stats(bfb::pb::bfb::sim::v1::GetStatsRequest {})
    .await
    .expect("stats")
    .into_inner();

    // Shutting down flushes the spans.
    sigterm(&bfb);
    let status = tokio::time::timeout(Duration::from_secs(15), bfb.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success());

    let mut spans = Vec::new();
    let mut service_names = Vec::new();
    while let Ok(Some(export)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        for rs in export.resource_spans {
            for kv in rs.resource.iter().flat_map(|r| &r.attributes) {
                if let Some(Value::StringValue(v)) =
                    kv.value.as_ref().and_then(|v| v.value.as_ref())
                {
                    service_names.push(format!("{}={v}", kv.key));
                }
            }
            spans.extend(rs.scope_spans.into_iter().flat_map(|s| s.spans));
        }
    }
    assert!(
        service_names.contains(&"service.name=bfb".to_string()),
        "{service_names:?}"
    );
    assert!(
        service_names.contains(&"deployment.environment=test".to_string()),
        "{service_names:?}"
    );
    let in_trace: Vec<&Span> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace_id)
        .collect();
    let server = in_trace
        .iter()
        .find(|s| s.name == "GetCustomer")
        .expect("server span");
    assert_eq!(
        hex(&server.parent_span_id),
        caller_span,
        "continues the caller's trace"
    );
    assert_eq!(
        attr(server, "rpc.grpc.status_code"),
        Some(&Value::StringValue("OK".into()))
    );

    let children: Vec<&&Span> = in_trace
        .iter()
        .filter(|s| s.parent_span_id == server.span_id)
        .collect();
    let mut components: Vec<String> = children
        .iter()
        .filter_map(|s| match attr(s, "component") {
            Some(Value::StringValue(c)) => Some(c.clone()),
            _ => None,
        })
        .collect();
    components.sort();
    assert_eq!(components, ["favorites", "orders", "profile", "reviews"]);
    for child in &children {
        assert_eq!(attr(child, "attempt"), Some(&Value::IntValue(1)));
        assert_eq!(attr(child, "hedged"), Some(&Value::BoolValue(false)));
        assert_eq!(
            attr(child, "rpc.grpc.status_code"),
            Some(&Value::StringValue("OK".into()))
        );
        assert!(matches!(attr(child, "budget_ms"), Some(Value::DoubleValue(ms)) if *ms > 0.0));
    }

    // The orders service received the trace context of its own attempt span.
    let orders_span = children
        .iter()
        .find(|s| attr(s, "component") == Some(&Value::StringValue("orders".into())))
        .expect("orders span");
    let traceparent = stats.services["orders"]
        .last_metadata
        .get("traceparent")
        .expect("propagated")
        .clone();
    assert_eq!(
        traceparent,
        format!("00-{trace_id}-{}-01", hex(&orders_span.span_id))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_never_affects_calls() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let (sim, _sim_stop) = start_sim(SimConfig::default()).await;
    let (mut bfb, addr) = spawn_bfb(sim, |c| {
        c.replace(
            "# otlp_endpoint = \"http://127.0.0.1:4317\"",
            &format!("otlp_endpoint = \"http://{dead}\""),
        )
        .replace("export_interval = \"5s\"", "export_interval = \"10ms\"")
        .replace("drain_delay = \"5s\"", "drain_delay = \"0s\"")
    })
    .await;
    let mut client = CustomerAggregateServiceClient::new(common::channel(addr).await);
    for i in 1..=50 {
        let resp = client
            .get_customer(get(&format!("c-{i}")))
            .await
            .expect("ok despite the collector");
        assert!(!resp.into_inner().status.expect("status").degraded);
    }
    sigterm(&bfb);
    let status = tokio::time::timeout(Duration::from_secs(30), bfb.wait())
        .await
        .expect("exits")
        .expect("status");
    assert!(status.success(), "{status:?}");
}
