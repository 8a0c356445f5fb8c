//! Interop with the real `grpcurl` binary (installed by `make test`; the
//! `GRPCURL` variable may name another binary): reflection-driven list and
//! describe, a call to every RPC, and a health check. grpcurl 1.8.6 speaks
//! only reflection v1alpha, so this also proves that version is served.

mod common;

use std::net::SocketAddr;

use bfb::sim::SimConfig;
use serde_json::Value;
use tokio::process::Command;

struct Out {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// `grpcurl -plaintext FLAGS ADDR REST`.
async fn grpcurl(addr: SocketAddr, flags: &[&str], rest: &[&str]) -> Out {
    let bin = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    let out = Command::new(&bin)
        .arg("-plaintext")
        .args(flags)
        .arg(addr.to_string())
        .args(rest)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {bin} (make test installs it): {e}"));
    Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json(out: &Out) -> Value {
    assert!(out.ok, "grpcurl failed: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.stdout))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_calls_everything() {
    let h = common::start(SimConfig::default(), |_| {}).await;

    let list = grpcurl(h.bfb, &[], &["list"]).await;
    assert!(list.ok, "{}", list.stderr);
    let services: Vec<&str> = list.stdout.lines().collect();
    for s in [
        "bfb.customer.v1.CustomerAggregateService",
        "bfb.activity.v1.UserActivityService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.contains(&s), "{s} not listed: {services:?}");
    }
    assert!(
        !list.stdout.contains("downstream."),
        "downstream contracts are not bfb's API"
    );

    // describe shows the proto comments, through reflection only.
    let d = grpcurl(
        h.bfb,
        &[],
        &["describe", "bfb.customer.v1.GetCustomerRequest"],
    )
    .await;
    assert!(d.ok, "{}", d.stderr);
    assert!(
        d.stdout.contains("The customer id, for example \"c-42\""),
        "{}",
        d.stdout
    );
    let d = grpcurl(
        h.bfb,
        &[],
        &["describe", "bfb.activity.v1.UserActivityService"],
    )
    .await;
    assert!(d.stdout.contains("rpc GetUserActivity"), "{}", d.stdout);

    let c = json(
        &grpcurl(
            h.bfb,
            &[
                "-d",
                r#"{"customer_id":"c-42","read_mask":{"paths":["profile","orders"]}}"#,
            ],
            &["bfb.customer.v1.CustomerAggregateService/GetCustomer"],
        )
        .await,
    );
    assert_eq!(c["customer"]["customerId"], "c-42");
    assert!(c["customer"]["profile"]["displayName"].is_string());
    assert!(c["customer"]["favorites"].is_null());
    assert_eq!(
        c["status"]["components"]["favorites"]["state"],
        "COMPONENT_STATE_SKIPPED"
    );
    assert_eq!(
        c["status"]["components"]["orders"]["state"],
        "COMPONENT_STATE_OK"
    );

    let a = json(
        &grpcurl(
            h.bfb,
            &[
                "-d",
                r#"{"user_id":"u-7","window":{"start_time":"2025-12-01T00:00:00Z"}}"#,
            ],
            &["bfb.activity.v1.UserActivityService/GetUserActivity"],
        )
        .await,
    );
    let timeline = a["activity"]["timeline"].as_array().expect("timeline");
    assert!(!timeline.is_empty());
    assert!(
        timeline
            .iter()
            .all(|e| e["time"].as_str().expect("time") >= "2025-12-01")
    );

    for service in [
        "",
        "bfb.customer.v1.CustomerAggregateService",
        "bfb.activity.v1.UserActivityService",
    ] {
        let body = format!(r#"{{"service":"{service}"}}"#);
        let health = json(&grpcurl(h.bfb, &["-d", &body], &["grpc.health.v1.Health/Check"]).await);
        assert_eq!(health["status"], "SERVING", "{service:?}");
    }

    // Errors arrive with their google.rpc details decoded.
    let bad = grpcurl(
        h.bfb,
        &["-d", r#"{"customer_id":""}"#],
        &["bfb.customer.v1.CustomerAggregateService/GetCustomer"],
    )
    .await;
    assert!(!bad.ok);
    assert!(bad.stderr.contains("InvalidArgument"), "{}", bad.stderr);
    assert!(
        bad.stderr.contains("google.rpc.BadRequest")
            && bad.stderr.contains("\"field\":\"customer_id\""),
        "{}",
        bad.stderr
    );

    // The sim is driven the same way (the demo's fault injection).
    let set = grpcurl(
        h.sim,
        &["-d", r#"{"service":"orders","behavior":{"error_rate":1}}"#],
        &["bfb.sim.v1.SimControl/SetBehavior"],
    )
    .await;
    assert!(set.ok, "{}", set.stderr);
    let degraded = json(
        &grpcurl(
            h.bfb,
            &["-d", r#"{"customer_id":"c-42"}"#],
            &["bfb.customer.v1.CustomerAggregateService/GetCustomer"],
        )
        .await,
    );
    assert_eq!(degraded["status"]["degraded"], true);
    assert_eq!(
        degraded["status"]["components"]["orders"]["reason"],
        "UNAVAILABLE"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_shows_a_small_readable_error_for_any_input() {
    let h = common::start(SimConfig::default(), |_| {}).await;
    let long = "x".repeat(10_000);
    let many = vec!["\"x\""; 3_000].join(",");
    for body in [
        format!(r#"{{"customer_id":"c-1","read_mask":{{"paths":["{long}"]}}}}"#),
        format!(r#"{{"customer_id":"c-1","read_mask":{{"paths":[{many}]}}}}"#),
    ] {
        let out = grpcurl(
            h.bfb,
            &["-d", &body],
            &["bfb.customer.v1.CustomerAggregateService/GetCustomer"],
        )
        .await;
        assert!(!out.ok);
        assert!(
            out.stderr.contains("Code: InvalidArgument"),
            "{}",
            out.stderr
        );
        assert!(out.stderr.contains("read_mask.paths[0]"), "{}", out.stderr);
        assert!(out.stderr.len() < 4096, "{} bytes", out.stderr.len());
    }
}
