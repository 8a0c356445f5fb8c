//! The `bfb` binary: `check-config`, and `bfb sim` as its own process serving
//! a chosen subset of services (what resilience tests kill and restart).

mod common;

use std::process::Stdio;

use bfb::pb::{
    bfb::sim::v1::{GetStatsRequest, sim_control_client::SimControlClient},
    downstream::{
        orders::v1::{ListOrdersRequest, orders_service_client::OrdersServiceClient},
        profile::v1::{GetProfileRequest, profile_service_client::ProfileServiceClient},
    },
};
use tokio::io::{AsyncBufReadExt, BufReader};

const BFB: &str = env!("CARGO_BIN_EXE_bfb");

#[test]
fn check_config_accepts_the_example_and_lists_every_problem() {
    let ok = std::process::Command::new(BFB)
        .args(["check-config", "config/bfb.example.toml"])
        .output()
        .expect("run");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    let dir = std::env::temp_dir().join(format!("bfb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("bad.toml");
    let text = std::fs::read_to_string("config/bfb.example.toml")
        .expect("example")
        .replace("max = \"30s\"", "max = \"1s\"")
        .replace(
            "endpoint = \"http://127.0.0.1:50061\"\n\n[downstreams.favorites]",
            "endpoint = \"127.0.0.1\"\n\n[downstreams.favorites]",
        );
    std::fs::write(&bad, text).expect("write");
    let out = std::process::Command::new(BFB)
        .arg("check-config")
        .arg(&bad)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("2 problem(s)"), "{stdout}");
    assert!(
        stdout.contains("deadlines.max: must be at least deadlines.default (2s)"),
        "{stdout}"
    );
    assert!(stdout.contains("downstreams.profile.endpoint"), "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sim_process_serves_only_the_chosen_services() {
    let mut child = tokio::process::Command::new(BFB)
        .args([
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--services",
            "orders",
            "--customers",
            "5",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sim");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .await
        .expect("read");
    let addr: std::net::SocketAddr = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let channel = common::channel(addr).await;

    let orders = OrdersServiceClient::new(channel.clone())
        .list_orders(ListOrdersRequest {
            customer_id: "c-5".into(),
        })
        .await
        .expect("orders served");
    assert!(
        orders
            .into_inner()
            .orders
            .iter()
            .all(|o| o.order_id.starts_with("o-5-"))
    );
    let missing = OrdersServiceClient::new(channel.clone())
        .list_orders(ListOrdersRequest {
            customer_id: "c-6".into(),
        })
        .await
        .expect_err("only 5 customers");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let profile = ProfileServiceClient::new(channel.clone())
        .get_profile(GetProfileRequest {
            customer_id: "c-1".into(),
        })
        .await
        .expect_err("profile not served");
    assert_eq!(profile.code(), tonic::Code::Unimplemented);
    let stats = SimControlClient::new(channel)
        .get_stats(GetStatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.services.keys().collect::<Vec<_>>(), ["orders"]);
    assert_eq!(stats.services["orders"].calls, 2);
    child.kill().await.expect("kill");
}

#[tokio::test]
async fn demo_serves_bfb_and_the_sim_and_prints_working_commands() {
    let mut child = tokio::process::Command::new(BFB)
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--sim-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--sim-latency",
            "1ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn demo");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next_line().await.expect("read").expect("a line");
    // "bfb demo: bfb on ADDR, simulated downstream services on ADDR (...)"
    let addr = |after: &str| -> std::net::SocketAddr {
        let rest = first
            .split(after)
            .nth(1)
            .unwrap_or_else(|| panic!("{after} in {first:?}"));
        let token = rest
            .split([',', ' '])
            .find(|t| !t.is_empty())
            .expect("address");
        token.parse().unwrap_or_else(|_| panic!("{token:?}"))
    };
    let (bfb_addr, sim_addr) = (addr("bfb on "), addr("services on "));
    let mut printed = String::new();
    while let Ok(Some(line)) = lines.next_line().await {
        printed.push_str(&line);
        printed.push('\n');
        if line.starts_with("Ctrl-C") {
            break;
        }
    }
    assert!(printed.contains(&format!(
        "{bfb_addr} bfb.customer.v1.CustomerAggregateService/GetCustomer"
    )));
    assert!(printed.contains(&format!("{sim_addr} bfb.sim.v1.SimControl/SetBehavior")));

    use bfb::pb::bfb::customer::v1::{
        GetCustomerRequest, customer_aggregate_service_client::CustomerAggregateServiceClient,
    };
    let resp = CustomerAggregateServiceClient::new(common::channel(bfb_addr).await)
        .get_customer(GetCustomerRequest {
            customer_id: "c-42".into(),
            ..Default::default()
        })
        .await
        .expect("the demo answers")
        .into_inner();
    assert!(resp.customer.expect("customer").profile.is_some());
    // The demo runs without authentication, and says so.
    let mut log = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let warned = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while let Ok(Some(line)) = log.next_line().await {
            if line.contains("WARN") && line.contains("authentication is off") {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(warned, Ok(true), "a warning about auth.mode = none");
    child.kill().await.expect("kill");
}

#[test]
fn check_config_reports_mistakes_found_while_parsing_all_at_once() {
    let dir = std::env::temp_dir().join(format!("bfb-cli3-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let bad = dir.join("three.toml");
    let text = std::fs::read_to_string("config/bfb.example.toml")
        .expect("example")
        .replace("[telemetry]", "[telemetry]\nlog_formatt = \"json\"")
        .replace("default = \"2s\"", "default = \"2 fortnights please\"");
    // [downstreams.sms] without its endpoint.
    let sms = text.find("[downstreams.sms]").expect("sms");
    let endpoint = sms + text[sms..].find("endpoint").expect("endpoint");
    let end = endpoint + text[endpoint..].find('\n').expect("eol");
    std::fs::write(&bad, format!("{}{}", &text[..endpoint], &text[end + 1..])).expect("write");
    let out = std::process::Command::new(BFB)
        .arg("check-config")
        .arg(&bad)
        .output()
        .expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("3 problem(s)"), "{stdout}");
    for expected in [
        "telemetry.log_formatt: unknown key; did you mean log_format?",
        "deadlines.default: ",
        "downstreams.sms.endpoint: missing; this key is required",
    ] {
        assert!(stdout.contains(expected), "{expected} not in:\n{stdout}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_taken_port_is_named_with_its_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = std::env::temp_dir().join(format!("bfb-cli-port-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("bfb.toml");
    let text = common::example_on_port_0(&addr.to_string());
    std::fs::write(&config, text).expect("write");
    let out = tokio::process::Command::new(BFB)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .await
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "telemetry.metrics_listen {addr}: address already in use"
        )),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn human_logs_to_a_pipe_have_no_colour_codes_and_print_values() {
    let dir = std::env::temp_dir().join(format!("bfb-cli-log-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("bfb.toml");
    let text = common::example_on_port_0("127.0.0.1:0");
    std::fs::write(&config, text).expect("write");
    let mut child = tokio::process::Command::new(BFB)
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .env_remove("BFB_LOG_FORMAT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut log = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut seen = Vec::new();
    let serving = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        while let Ok(Some(line)) = log.next_line().await {
            let done = line.contains("bfb serving");
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await;
    child.kill().await.expect("kill");
    assert_eq!(serving, Ok(true), "{seen:?}");
    assert!(seen.iter().all(|l| !l.contains('\x1b')), "{seen:?}");
    assert!(seen.iter().all(|l| !l.contains("Some(")), "{seen:?}");
    let serving = seen.last().expect("line");
    assert!(serving.contains("grpc=127.0.0.1:"), "{serving}");
    let _ = std::fs::remove_dir_all(&dir);
}
