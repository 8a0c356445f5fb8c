//! The operations kit in `deploy/` works with the bfb that ships it: the
//! alerting rules pass their promtool unit tests, and every metric the rules
//! and the Grafana dashboard use exists in a running bfb's `/metrics`, with
//! known label sets there at zero before the first call.

mod common;

use std::{collections::BTreeSet, process::Command};

use bfb::sim::SimConfig;

fn promtool(args: &[&str]) -> std::process::Output {
    let bin = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    Command::new(&bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin} (make test installs it): {e}"))
}

#[test]
fn the_alerting_rules_pass_their_unit_tests() {
    for args in [
        ["check", "rules", "deploy/prometheus/alerts.yaml"],
        ["test", "rules", "deploy/prometheus/alerts_test.yaml"],
    ] {
        let out = promtool(&args);
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every `bfb_*` name in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("bfb_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        out.insert(name);
    }
    out
}

/// The metric families of an exposition: `name → type`.
fn families(exposition: &str) -> Vec<(String, String)> {
    exposition
        .lines()
        .filter_map(|l| {
            let mut parts = l.strip_prefix("# TYPE ")?.split(' ');
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

fn exported(families: &[(String, String)], name: &str) -> bool {
    families.iter().any(|(family, kind)| {
        family == name
            || (kind == "histogram"
                && ["_bucket", "_count", "_sum"]
                    .iter()
                    .any(|suffix| name.strip_suffix(suffix) == Some(family)))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_dashboard_use_only_metrics_bfb_exports() {
    // With a consumer, so its per-consumer series exist too, and one
    // downstream named by a host name, so the DNS series do.
    let h = common::start(SimConfig::default(), |c| {
        c.auth.consumers.insert(
            "reports".into(),
            common::tls::consumer(
                &["reports"],
                &["bfb.customer.v1.CustomerAggregateService/*"],
                &[],
            ),
        );
        let profile = c
            .downstream_mut(bfb::component::Component::Profile)
            .expect("profile");
        profile.endpoint = profile.endpoint.replace("127.0.0.1", "localhost");
    })
    .await;
    // The first call waits for the first resolution of the name.
    h.customers()
        .await
        .get_customer(bfb::pb::bfb::customer::v1::GetCustomerRequest {
            customer_id: "c-1".into(),
            ..Default::default()
        })
        .await
        .expect("call");
    let exposition = h.metrics_text().await;
    let families = families(&exposition);

    let rules = std::fs::read_to_string("deploy/prometheus/alerts.yaml").expect("alerts");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string("deploy/grafana/bfb.json").expect("dashboard"),
    )
    .expect("dashboard JSON");
    let mut exprs = String::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push_str(target["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
    }
    for (what, text) in [("alerts.yaml", &rules), ("bfb.json", &exprs)] {
        let used = names(text);
        assert!(used.len() >= 8, "{what}: {used:?}");
        let unknown: Vec<_> = used.iter().filter(|n| !exported(&families, n)).collect();
        assert!(
            unknown.is_empty(),
            "{what} uses metrics bfb does not export: {unknown:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_label_sets_are_exported_at_zero_before_any_call() {
    let h = common::start(SimConfig::default(), |_| {}).await;
    let text = h.metrics_text().await;
    for series in [
        r#"bfb_auth_rejected_total{reason="jwt_expired"}"#,
        r#"bfb_auth_rejected_total{reason="no_client_certificate"}"#,
        r#"bfb_degraded_responses_total{component="orders",reason="UNAVAILABLE"}"#,
        r#"bfb_cache_requests_total{component="profile",result="hit"}"#,
        r#"bfb_cache_shared_total{result="timeout"}"#,
        r#"bfb_rpc_duration_seconds_count{method="GetCustomer",code="OK"}"#,
        r#"bfb_rpc_duration_seconds_count{method="StreamUserActivity",code="OK"}"#,
        r#"bfb_downstream_duration_seconds_count{downstream="sms",code="OK"}"#,
        r#"bfb_breaker_transitions_total{downstream="orders",to="open"}"#,
        r#"bfb_tls_handshakes_dropped_total{reason="shed"}"#,
        "bfb_load_shed_total",
    ] {
        assert_eq!(common::sample(&text, series), 0.0, "{series}");
    }
}

/// The HPA's load signal counts RPCs while they are in flight, and only
/// then (health checks excepted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpcs_in_flight_follow_the_calls() {
    let h = common::start(
        common::sim_with_latency(std::time::Duration::from_millis(400)),
        |_| {},
    )
    .await;
    let series = "bfb_rpcs_in_flight";
    let until = |want: f64| {
        let h = &h;
        async move {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                let now = common::metric(&h.metrics_text().await, series);
                if now == Some(want) {
                    return;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{series} is {now:?}, not {want}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    };
    until(0.0).await;
    let client = h.customers().await;
    let calls: Vec<_> = (0..5)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.get_customer(bfb::pb::bfb::customer::v1::GetCustomerRequest {
                    customer_id: format!("c-{}", i + 1),
                    ..Default::default()
                })
                .await
                .map(drop)
            })
        })
        .collect();
    until(5.0).await;
    for c in calls {
        c.await.expect("task").expect("call");
    }
    until(0.0).await;
}
