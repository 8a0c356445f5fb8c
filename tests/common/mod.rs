//! Test harness: the real sim and the real bfb server on loopback port 0,
//! with generated clients.

#![allow(dead_code)]

pub mod dns;
pub mod python;
pub mod redis;
pub mod tls;

use std::{net::SocketAddr, time::Duration};

use bfb::{
    config::Config,
    pb::bfb::{
        activity::v1::user_activity_service_client::UserActivityServiceClient,
        customer::v1::customer_aggregate_service_client::CustomerAggregateServiceClient,
        sim::v1::{
            Behavior, GetStatsRequest, GetStatsResponse, ServiceStats, SetBehaviorRequest,
            sim_control_client::SimControlClient,
        },
    },
    sim::{self, SimConfig},
};
use tokio::{net::TcpListener, sync::watch};
use tonic::transport::Channel;

/// A running sim + bfb pair; both stop when this is dropped.
pub struct Harness {
    pub bfb: SocketAddr,
    pub sim: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
    /// The plaintext health-only listener.
    pub health: SocketAddr,
    _stop: watch::Sender<()>,
}

async fn stopped(mut rx: watch::Receiver<()>) {
    let _ = rx.changed().await;
}

/// Starts a sim with `sim_config` and bfb on the example config pointed at it,
/// after `tweak` adjusts the config.
pub async fn start(sim_config: SimConfig, tweak: impl FnOnce(&mut Config)) -> Harness {
    let (stop, rx) = watch::channel(());
    let sim_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind sim");
    let sim = sim_listener.local_addr().expect("sim addr");
    tokio::spawn(sim::serve(sim_config, sim_listener, stopped(rx.clone())));

    let mut config = Config::example()
        .expect("example config")
        .with_all_endpoints(&[format!("http://{sim}")]);
    config.server.drain_delay = Duration::ZERO;
    tweak(&mut config);
    assert!(config.problems().is_empty(), "{:?}", config.problems());
    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind bfb");
    let bfb = grpc.local_addr().expect("bfb addr");
    let metrics_listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let metrics = metrics_listener.local_addr().expect("metrics addr");
    let admin_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let admin = admin_listener.local_addr().expect("admin addr");
    let health_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind health");
    let health = health_listener.local_addr().expect("health addr");
    let listeners = bfb::server::Listeners {
        grpc,
        metrics: Some(metrics_listener),
        admin: Some(admin_listener),
        health: Some(health_listener),
    };
    tokio::spawn(async move { bfb::server::serve(&config, listeners, stopped(rx)).await });
    Harness {
        bfb,
        sim,
        metrics,
        admin,
        health,
        _stop: stop,
    }
}

/// One more bfb, against an existing sim; stops when dropped.
pub struct Bfb {
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub admin: SocketAddr,
    _stop: watch::Sender<()>,
}

/// Starts bfb on the example config pointed at `sim`, after `tweak`.
pub async fn start_bfb(sim: SocketAddr, tweak: impl FnOnce(&mut Config)) -> Bfb {
    let (stop, rx) = watch::channel(());
    let mut config = Config::example()
        .expect("example config")
        .with_all_endpoints(&[format!("http://{sim}")]);
    config.server.drain_delay = Duration::ZERO;
    tweak(&mut config);
    let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind bfb");
    let addr = grpc.local_addr().expect("addr");
    let m = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind metrics");
    let metrics = m.local_addr().expect("addr");
    let a = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let admin = a.local_addr().expect("addr");
    let listeners = bfb::server::Listeners {
        grpc,
        metrics: Some(m),
        admin: Some(a),
        health: None,
    };
    tokio::spawn(async move { bfb::server::serve(&config, listeners, stopped(rx)).await });
    Bfb {
        addr,
        metrics,
        admin,
        _stop: stop,
    }
}

/// The `bfb` binary run with `args` as its own process (killed when
/// dropped); returns it and the address it serves on, read from the first
/// line it prints (`... listening on ADDR`).
pub async fn spawn_bfb_process(args: &[&std::ffi::OsStr]) -> (tokio::process::Child, SocketAddr) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bfb"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn bfb");
    let mut line = String::new();
    tokio::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .await
        .expect("read");
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, addr)
}

/// `bfb sim` as its own process on `addr` with further `args` (e.g.
/// `--services orders`); returns the process and the address it serves on.
pub async fn sim_process(addr: &str, args: &[&str]) -> (tokio::process::Child, SocketAddr) {
    let mut all: Vec<&std::ffi::OsStr> = ["sim", "--listen", addr].map(AsRef::as_ref).to_vec();
    all.extend(args.iter().map(AsRef::<std::ffi::OsStr>::as_ref));
    spawn_bfb_process(&all).await
}

/// `n` sims as processes on 127.0.0.2, .3, ... sharing one port (Linux
/// routes all of 127.0.0.0/8 to loopback): replicas of one downstream.
pub async fn sim_replicas(n: u8) -> (Vec<tokio::process::Child>, Vec<SocketAddr>, u16) {
    let port = dns::free_port("127.0.0.2");
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..n {
        let (child, addr) = sim_process(&format!("127.0.0.{}:{port}", i + 2), &[]).await;
        children.push(child);
        addrs.push(addr);
    }
    (children, addrs, port)
}

/// The example config with every listener on port 0, the metrics endpoint
/// on `metrics_listen` instead, for `bfb serve` run as a process.
pub fn example_on_port_0(metrics_listen: &str) -> String {
    bfb::config::EXAMPLE
        .replace("listen = \"127.0.0.1:50051\"", "listen = \"127.0.0.1:0\"")
        .replace(
            "admin_listen = \"127.0.0.1:50052\"",
            "admin_listen = \"127.0.0.1:0\"",
        )
        .replace(
            "metrics_listen = \"127.0.0.1:9464\"",
            &format!("metrics_listen = \"{metrics_listen}\""),
        )
}

/// A sim with every service at `latency`.
pub fn sim_with_latency(latency: Duration) -> SimConfig {
    let mut c = SimConfig::default();
    c.behavior.latency = latency;
    c
}

pub async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

impl Harness {
    pub async fn customers(&self) -> CustomerAggregateServiceClient<Channel> {
        CustomerAggregateServiceClient::new(channel(self.bfb).await)
    }

    pub async fn activity(&self) -> UserActivityServiceClient<Channel> {
        UserActivityServiceClient::new(channel(self.bfb).await)
    }

    pub async fn control(&self) -> SimControlClient<Channel> {
        SimControlClient::new(channel(self.sim).await)
    }

    pub async fn stats(&self) -> GetStatsResponse {
        self.control()
            .await
            .get_stats(GetStatsRequest {})
            .await
            .expect("stats")
            .into_inner()
    }

    pub async fn service_stats(&self, service: &str) -> ServiceStats {
        self.stats()
            .await
            .services
            .remove(service)
            .expect("service stats")
    }

    /// The current metrics exposition.
    pub async fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics").await
    }

    /// Calls received per service, in a map for readable assertions.
    pub async fn calls(&self) -> std::collections::BTreeMap<String, u64> {
        self.stats()
            .await
            .services
            .into_iter()
            .map(|(k, v)| (k, v.calls))
            .collect()
    }

    pub async fn set_behavior(&self, service: &str, behavior: Behavior) {
        self.control()
            .await
            .set_behavior(SetBehaviorRequest {
                service: service.into(),
                behavior: Some(behavior),
            })
            .await
            .expect("set behavior");
    }

    /// Waits (bounded) until each of `services` saw exactly one call
    /// cancelled and has none in flight, and fails the test otherwise: the
    /// caller's deadline or hang-up reached every downstream call.
    pub async fn assert_each_cancelled_once(&self, services: &[&str]) {
        let stats = self
            .wait_for_stats(|s| services.iter().all(|k| s.services[*k].cancelled == 1))
            .await;
        for s in services {
            assert_eq!(stats.services[*s].cancelled, 1, "{s}");
            assert_eq!(stats.services[*s].in_flight, 0, "{s}");
        }
    }

    /// Waits (bounded) until `check` holds for the sim's stats; returns the
    /// last stats seen. For effects that reach the sim asynchronously, such
    /// as a cancellation travelling as an HTTP/2 reset.
    pub async fn wait_for_stats(
        &self,
        check: impl Fn(&GetStatsResponse) -> bool,
    ) -> GetStatsResponse {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let stats = self.stats().await;
            if check(&stats) || tokio::time::Instant::now() > deadline {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Waits (bounded: 10 s) until the sim at `sim` reports stats for which
/// `check` holds, and returns them; fails the test naming `what` otherwise.
pub async fn until_sim(
    sim: SocketAddr,
    what: &str,
    check: impl Fn(&GetStatsResponse) -> bool,
) -> GetStatsResponse {
    let mut control = SimControlClient::new(channel(sim).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = control
            .get_stats(GetStatsRequest {})
            .await
            .expect("sim stats")
            .into_inner();
        if check(&stats) {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// GET over HTTP/1.0 (close-delimited body), enough for /metrics; the body
/// of a 200 answer.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: bfb\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("http response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.to_string()
}

/// The value of one series (`name{labels}`) in a Prometheus exposition;
/// `None` when the series is missing, so a check of a missing series fails.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The value of a series that must be present.
pub fn sample(text: &str, series: &str) -> f64 {
    metric(text, series).unwrap_or_else(|| panic!("no series {series} in the metrics"))
}

/// Sends `signal` (`STOP`, `CONT`, `KILL`, `TERM`) to process `pid`.
pub fn signal(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success(), "kill -{signal} {pid}");
}

pub fn millis(ms: u64) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(Duration::from_millis(ms)).ok()
}

pub fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| p.to_string()).collect(),
    })
}

/// A request with a caller deadline.
pub fn with_timeout<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(timeout);
    r
}
