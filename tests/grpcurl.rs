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

/// The grpcurl commands in `text` (lines that start with `grpcurl` once
/// indented, `\` continuations joined), as argument lists after `grpcurl`.
fn commands(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let line = line.trim_start();
        if !line.starts_with("grpcurl ") {
            continue;
        }
        let mut command = line.to_string();
        while command.ends_with('\\') {
            command.pop();
            command.push_str(lines.next().unwrap_or_default().trim());
        }
        out.push(words(&command).into_iter().skip(1).collect());
    }
    out
}

/// Shell words, with '...' and "..." quoting (what the docs use).
fn words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quote, mut started) = (Vec::new(), String::new(), None, false);
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                started = true;
            }
            (None, c) if c.is_whitespace() => {
                if started || !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                started = false;
            }
            (None, c) => word.push(c),
        }
    }
    if started || !word.is_empty() {
        words.push(word);
    }
    words
}

/// Runs each command; each must reach the server and be answered: success,
/// or a gRPC status the docs show on purpose (a deadline, a failure mode).
/// A command that cannot be sent as written (no reflection, an unknown
/// method, JSON grpcurl rejects) fails the test.
async fn run_all(what: &str, commands: &[Vec<String>]) {
    let bin = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".into());
    for args in commands {
        let out = Command::new(&bin)
            .args(args)
            .output()
            .await
            .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || stderr.contains("Code: "),
            "{what}: grpcurl {} failed:\n{stderr}",
            args.join(" ")
        );
    }
}

/// The demo tests run one at a time: the demo's `-max-time 0.01` command
/// must get its reflection answer within 10 ms, which two demos side by side
/// on two cores do not always give.
static ONE_DEMO: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `bfb demo` on port 0 with `args`; its process, printed instructions and
/// the bfb, sim and admin addresses they name.
async fn demo(args: &[&str]) -> (tokio::process::Child, String, [String; 3]) {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut demo = Command::new(env!("CARGO_BIN_EXE_bfb"))
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--sim-listen",
            "127.0.0.1:0",
        ])
        .args(["--admin-listen", "127.0.0.1:0", "--sim-latency", "1ms"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn demo");
    let mut lines = BufReader::new(demo.stdout.take().expect("stdout")).lines();
    let mut printed = String::new();
    // The admin block comes last and ends with the endpoint list.
    while let Ok(Some(line)) = lines.next_line().await {
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("EndpointAdminService/ListEndpoints") && printed.contains("Admin API on ")
        {
            break;
        }
    }
    // "bfb demo: bfb on ADDR, simulated downstream services on ADDR (...)"
    // and "Admin API on ADDR: ...".
    let addr = |after: &str| -> String {
        let rest = printed
            .split(after)
            .nth(1)
            .unwrap_or_else(|| panic!("{after}"));
        let token = rest.split([',', ' ', ':']).next().unwrap_or_default();
        let port = rest[token.len() + 1..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap_or_default();
        format!("{token}:{port}")
    };
    let addrs = [addr("bfb on "), addr("services on "), addr("Admin API on ")];
    (demo, printed, addrs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpcurl_command_of_the_readme_and_the_demo_works() {
    let _one = ONE_DEMO.lock().await;
    let (mut demo, printed, [bfb, sim, admin]) = demo(&[]).await;
    let demo_commands = commands(&printed);
    assert!(demo_commands.len() >= 12, "{printed}");
    assert!(
        !printed.contains(r#""read_mask":""#),
        "the demo prints the FieldMask form grpcurl accepts"
    );
    run_all("demo", &demo_commands).await;

    let readme = std::fs::read_to_string("README.md")
        .expect("README")
        .replace("127.0.0.1:50051", &bfb)
        .replace("127.0.0.1:50061", &sim)
        .replace("127.0.0.1:50052", &admin);
    let readme_commands = commands(&readme);
    assert!(readme_commands.len() >= 12, "{readme_commands:?}");
    run_all("README", &readme_commands).await;
    demo.kill().await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_with_replicas_balances_over_them_and_lists_them() {
    let _one = ONE_DEMO.lock().await;
    let (mut demo, printed, [_, _, admin]) = demo(&["--replicas", "3"]).await;
    assert!(printed.contains("3 replicas"), "{printed}");
    // Its commands (make one replica slow, call, list) all work.
    run_all("demo --replicas 3", &commands(&printed)).await;
    let out = grpcurl(
        admin.parse().expect("admin addr"),
        &["-d", r#"{"downstreams":["orders"]}"#],
        &["bfb.admin.v1.EndpointAdminService/ListEndpoints"],
    )
    .await;
    let list = json(&out);
    let endpoints = list["downstreams"][0]["endpoints"]
        .as_array()
        .expect("endpoints");
    assert_eq!(endpoints.len(), 3, "{list}");
    let calls: u64 = endpoints
        .iter()
        .map(|e| {
            e["calls"]
                .as_str()
                .and_then(|c| c.parse().ok())
                .unwrap_or(0)
        })
        .sum();
    assert!(calls > 0, "the demo's calls reached the replicas: {list}");
    demo.kill().await.expect("kill");
}
