//! bfb as a fleet, with real parts: three `bfb serve` processes sharing one
//! `redis-server`, behind HAProxy running `deploy/haproxy/haproxy.cfg`, a
//! `bfb sim` process downstream, and steady load from a Python grpcio
//! client (`tests/interop/load.py`). Scenarios: SIGTERM one replica (no
//! call fails), `kill -9` one (a handful fail, routed around at once; the
//! restarted replica serves warm entries from Redis), and coalescing across
//! the fleet (500 identical cold calls make at most one downstream call per
//! replica and component; none once the shared tier is warm).

mod common;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use bfb::pb::bfb::sim::v1::{GetStatsRequest, sim_control_client::SimControlClient};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// One test at a time: each runs a whole fleet under load.
static ONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The Redis the replicas share.
#[derive(Clone)]
enum Shared {
    /// One server.
    Server(SocketAddr),
    /// A master behind these sentinels.
    Sentinel(Vec<String>),
    /// A cluster, from these nodes.
    Cluster(Vec<String>),
}

impl Shared {
    /// The `[cache]` line naming it.
    fn toml(&self) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|u| format!("\"{u}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        match self {
            Shared::Server(a) => format!("redis_url = \"redis://{a}\""),
            Shared::Sentinel(s) => {
                format!(
                    "redis_sentinel = {{ master = \"bfb\", sentinels = [{}] }}",
                    list(s)
                )
            }
            Shared::Cluster(n) => format!("redis_cluster = [{}]", list(n)),
        }
    }
}

struct Fleet {
    sim: SocketAddr,
    _sim: Child,
    _redis: Option<Child>,
    /// The single server, in `Shared::Server` mode.
    redis: SocketAddr,
    shared: Shared,
    replicas: Vec<Option<Child>>,
    addrs: Vec<SocketAddr>,
    lb: SocketAddr,
    _lb: Child,
    dir: PathBuf,
    stubs: PathBuf,
}

/// bfb's config for replica `i`: the example, on `addr` (its metrics and
/// readiness on the next port), downstreams at `sim`, the cache on with the
/// shared tier at `redis`, a short drain.
fn config(addr: SocketAddr, sim: SocketAddr, shared: &Shared) -> String {
    common::example_on_port_0(&metrics_of(addr).to_string())
        .replacen(
            "\nlisten = \"127.0.0.1:0\"",
            &format!("\nlisten = \"{addr}\""),
            1,
        )
        .replace("http://127.0.0.1:50061", &format!("http://{sim}"))
        .replace("[cache]\nenabled = false", "[cache]\nenabled = true")
        .replace("# redis_url = \"redis://127.0.0.1:6379\"", &shared.toml())
        // Generous for a debug build taking 500 calls at once on two cores;
        // past it the tier is skipped (fail-open), by design.
        .replace("redis_timeout = \"20ms\"", "redis_timeout = \"1s\"")
        .replace("drain_delay = \"5s\"", "drain_delay = \"1s\"")
        .replace("shutdown_grace = \"20s\"", "shutdown_grace = \"5s\"")
}

/// Replica `addr`'s metrics port: the port after its gRPC port.
fn metrics_of(addr: SocketAddr) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], addr.port() + 1))
}

async fn replica(
    dir: &Path,
    i: usize,
    addr: SocketAddr,
    sim: SocketAddr,
    shared: &Shared,
) -> Child {
    let path = dir.join(format!("bfb-{i}.toml"));
    std::fs::write(&path, config(addr, sim, shared)).expect("config");
    let (child, listening) =
        common::spawn_bfb_process(&["serve".as_ref(), "--config".as_ref(), path.as_os_str()]).await;
    assert_eq!(listening, addr);
    child
}

/// A fleet sharing one `redis-server`.
async fn fleet() -> Fleet {
    let (redis_child, redis) = common::redis::server(&[]).await;
    fleet_on(Shared::Server(redis), vec![redis], Some(redis_child)).await
}

/// A fleet sharing `shared`, whose nodes are `nodes` (where the replicas'
/// invalidation subscribers show).
async fn fleet_on(shared: Shared, nodes: Vec<SocketAddr>, redis_child: Option<Child>) -> Fleet {
    let dir = std::env::temp_dir().join(format!("bfb-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (sim_child, sim) = common::sim_process("127.0.0.1:0", &["--latency", "2ms"]).await;
    let redis = nodes[0];
    // Each replica on a free port whose next port is free too (metrics),
    // below Linux's ephemeral range (32768 and up): a replica restarted on
    // its port must not find it taken by some outgoing connection, such as
    // HAProxy's own.
    let mut addrs: Vec<SocketAddr> = Vec::new();
    while addrs.len() < 3 {
        let p = rand::random_range(20_000..32_000u16);
        let pair = (
            std::net::TcpListener::bind(("127.0.0.1", p)),
            std::net::TcpListener::bind(("127.0.0.1", p + 1)),
        );
        if let (Ok(_), Ok(_)) = pair
            && !addrs.iter().any(|a| a.port().abs_diff(p) < 2)
        {
            addrs.push(([127, 0, 0, 1], p).into());
        }
    }
    let lb_port = common::redis::free_port();
    let mut replicas = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        replicas.push(Some(replica(&dir, i, *a, sim, &shared).await));
    }
    // Every replica has connected to Redis (a command connection and an
    // invalidation subscriber each), or its first answers stay in-process.
    common::redis::eventually("the replicas to connect to Redis", 20, || {
        let nodes = nodes.clone();
        async move {
            let mut subscribed = 0;
            for n in nodes {
                if let Ok(l) =
                    common::redis::query::<String>(n, redis::cmd("CLIENT").arg("LIST")).await
                {
                    subscribed += l.lines().filter(|c| c.contains("cmd=subscribe")).count();
                }
            }
            subscribed >= 3
        }
    })
    .await;
    let lb: SocketAddr = ([127, 0, 0, 1], lb_port).into();
    let haproxy = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("haproxy");
    let lb_child = Command::new(haproxy)
        .args(["-db", "-f", "deploy/haproxy/haproxy.cfg"])
        .env("BFB_LB_BIND", lb.to_string())
        .env("BFB_LB_ERRORS", "deploy/haproxy")
        .env("BFB_1", addrs[0].to_string())
        .env("BFB_2", addrs[1].to_string())
        .env("BFB_3", addrs[2].to_string())
        .env("BFB_1_METRICS", metrics_of(addrs[0]).port().to_string())
        .env("BFB_2_METRICS", metrics_of(addrs[1]).port().to_string())
        .env("BFB_3_METRICS", metrics_of(addrs[2]).port().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("haproxy (make test installs it)");
    common::redis::eventually("haproxy to listen", 10, || async move {
        tokio::net::TcpStream::connect(lb).await.is_ok()
    })
    .await;
    let stubs = common::python::stubs("fleet").await;
    Fleet {
        sim,
        _sim: sim_child,
        _redis: redis_child,
        redis,
        shared,
        replicas,
        addrs,
        lb,
        _lb: lb_child,
        dir,
        stubs,
    }
}

/// What the Python load client reported.
#[derive(Debug, Default)]
struct Report {
    calls: u64,
    failures: BTreeMap<String, u64>,
    /// Unix ms of each failure.
    failed_at: Vec<u64>,
    /// The failure lines as printed (code and details).
    lines: Vec<String>,
}

/// The running load client; `until_progress` waits for its calls to reach
/// a count (its own progress lines).
struct Load {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    report: Report,
}

impl Fleet {
    fn load(&self, target: SocketAddr, secs: f64, workers: u32, id: Option<&str>) -> Load {
        let mut cmd = Command::new(common::python::python());
        cmd.arg("tests/interop/load.py")
            .arg(&self.stubs)
            .arg(target.to_string())
            .arg(secs.to_string())
            .arg(workers.to_string());
        if let Some(id) = id {
            cmd.arg(id);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python (make test installs it)");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Load {
            child,
            lines,
            report: Report::default(),
        }
    }

    async fn sim_calls(&self) -> u64 {
        let stats = SimControlClient::new(common::channel(self.sim).await)
            .get_stats(GetStatsRequest {})
            .await
            .expect("stats")
            .into_inner();
        stats.services.values().map(|s| s.calls).sum()
    }

    async fn profile_calls(&self) -> u64 {
        SimControlClient::new(common::channel(self.sim).await)
            .get_stats(GetStatsRequest {})
            .await
            .expect("stats")
            .into_inner()
            .services["profile"]
            .calls
    }
}

impl Load {
    fn read(&mut self, line: &str) -> Option<u64> {
        let mut words = line.split_whitespace();
        match words.next()? {
            "progress" => words.next()?.parse().ok(),
            "fail" => {
                self.report.lines.push(line.to_string());
                self.report.failed_at.push(words.next()?.parse().ok()?);
                None
            }
            "summary" => {
                let v: serde_json::Value =
                    serde_json::from_str(line.strip_prefix("summary ")?).ok()?;
                self.report.calls = v["calls"].as_u64()?;
                for (k, n) in v["failures"].as_object()? {
                    self.report.failures.insert(k.clone(), n.as_u64()?);
                }
                None
            }
            _ => None,
        }
    }

    async fn until_progress(&mut self, calls: u64) {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let line = tokio::time::timeout_at(until, self.lines.next_line())
                .await
                .expect("the load made no progress")
                .expect("read")
                .expect("the load ended early");
            if self.read(&line).is_some_and(|n| n >= calls) {
                return;
            }
        }
    }

    async fn finish(mut self) -> Report {
        while let Ok(Some(line)) = self.lines.next_line().await {
            self.read(&line);
        }
        let status = self.child.wait().await.expect("wait");
        assert!(status.success(), "the load client failed");
        assert!(self.report.calls > 0, "no summary");
        self.report
    }
}

/// The HTTP status of `GET /ready` on `addr` (bfb's metrics port), if it
/// answers.
async fn ready_status(addr: SocketAddr) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /ready HTTP/1.0\r\nHost: bfb\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_drained_with_sigterm_fails_no_call() {
    let _one = ONE.lock().await;
    let mut f = fleet().await;
    let mut load = f.load(f.lb, 6.0, 8, None);
    load.until_progress(500).await;
    let mut victim = f.replicas[0].take().expect("replica");
    let ready = metrics_of(f.addrs[0]);
    assert_eq!(ready_status(ready).await, Some(200), "ready before");
    common::signal(victim.id().expect("pid"), "TERM");
    // Readiness for the load balancer turns 503 at once (within the drain).
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while ready_status(ready).await != Some(503) {
        assert!(
            tokio::time::Instant::now() < until,
            "GET /ready never said 503"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let exited = tokio::time::timeout(Duration::from_secs(15), victim.wait())
        .await
        .expect("drained in time")
        .expect("wait");
    assert!(exited.success(), "exit 0 after draining");
    let report = load.finish().await;
    eprintln!("SIGTERM under load: {report:?}");
    assert!(report.calls > 1_000, "{report:?}");
    assert!(
        report.failures.is_empty(),
        "calls failed during the drain: {report:?}"
    );
    let _ = std::fs::remove_dir_all(&f.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_costs_a_handful_of_calls_and_restarts_warm() {
    let _one = ONE.lock().await;
    let mut f = fleet().await;
    let workers = 8;
    let mut load = f.load(f.lb, 6.0, workers, None);
    load.until_progress(1_000).await;
    let mut victim = f.replicas[1].take().expect("replica");
    let killed_at = now_ms();
    victim.start_kill().expect("kill -9");
    let _ = victim.wait().await;
    let report = load.finish().await;
    eprintln!("kill -9 under load at {killed_at}: {report:?}");
    let failed: u64 = report.failures.values().sum();
    // Only calls in flight on it fail: at most one per worker.
    assert!(failed <= u64::from(workers), "{report:?}");
    // A call lost with the replica is UNAVAILABLE when HAProxy answers it
    // (its 502, mapped by grpc-unavailable.http), or a reset stream when
    // HAProxy had already begun relaying the answer (grpcio: UNKNOWN
    // "Stream removed"); nothing else.
    assert!(
        report.lines.iter().all(|l| {
            let code = l.split_whitespace().nth(2).unwrap_or_default();
            code == "UNAVAILABLE" || (code == "UNKNOWN" && l.ends_with("Stream removed"))
        }),
        "{report:?}"
    );
    // ... and only around the kill: routed around within two seconds.
    for at in &report.failed_at {
        assert!(
            *at + 100 >= killed_at && *at <= killed_at + 2_000,
            "a failure {} ms after the kill: {report:?}",
            at.saturating_sub(killed_at)
        );
    }

    // Restarted on its address, it serves what the fleet cached from Redis:
    // the load's 500 customers, without calling the downstreams.
    let addr = f.addrs[1];
    f.replicas[1] = Some(replica(&f.dir, 1, addr, f.sim, &f.shared).await);
    let before = f.sim_calls().await;
    let warm = f.load(addr, 1.0, 2, Some("c-7")).finish().await;
    assert!(warm.failures.is_empty() && warm.calls > 0, "{warm:?}");
    assert_eq!(
        f.sim_calls().await,
        before,
        "the restarted replica was cold"
    );
    let _ = std::fs::remove_dir_all(&f.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_cold_calls_coalesce_across_the_fleet() {
    let _one = ONE.lock().await;
    let f = fleet().await;
    // 500 identical calls for one customer nobody has fetched, spread over
    // the three replicas by HAProxy, 50 at a time.
    let before = f.profile_calls().await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(bfb::pb::bfb::customer::v1::customer_aggregate_service_client::CustomerAggregateServiceClient::new(
            common::channel(f.lb).await,
        ));
    }
    let burst = |id: &'static str| {
        let clients = clients.clone();
        async move {
            let mut tasks = Vec::new();
            for i in 0..500 {
                let mut c = clients[i % clients.len()].clone();
                tasks.push(tokio::spawn(async move {
                    c.get_customer(bfb::pb::bfb::customer::v1::GetCustomerRequest {
                        customer_id: id.into(),
                        ..Default::default()
                    })
                    .await
                    .map(drop)
                }));
            }
            for t in tasks {
                t.await.expect("task").expect("call");
            }
        }
    };
    burst("c-4242").await;
    let cold = f.profile_calls().await - before;
    assert!(
        (1..=3).contains(&cold),
        "{cold} profile calls for 500 identical cold calls over 3 replicas"
    );
    // Warm in the shared tier (written by whoever fetched it): a customer
    // fetched through one replica only is served by all three from Redis.
    let first = f.addrs[0];
    let one = bfb::pb::bfb::customer::v1::customer_aggregate_service_client::CustomerAggregateServiceClient::new(
        common::channel(first).await,
    );
    // The replica connects to Redis in the background: an answer cached
    // before that stays in-process, so each attempt takes a new id.
    let redis = f.redis;
    let mut n = 4_343;
    common::redis::eventually("an entry in Redis", 10, || {
        n += 1;
        let (mut one, id) = (one.clone(), format!("c-{n}"));
        async move {
            one.get_customer(bfb::pb::bfb::customer::v1::GetCustomerRequest {
                customer_id: id.clone(),
                ..Default::default()
            })
            .await
            .expect("call");
            for _ in 0..20 {
                let keys = common::redis::query::<Vec<String>>(
                    redis,
                    redis::cmd("KEYS").arg(format!("*|{id}|*")),
                )
                .await;
                if keys.is_ok_and(|k| k.len() >= 4) {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        }
    })
    .await;
    let warm: &'static str = format!("c-{n}").leak();
    let before = f.sim_calls().await;
    burst(warm).await;
    assert_eq!(
        f.sim_calls().await,
        before,
        "500 calls over a warm shared tier called a downstream"
    );
    let _ = std::fs::remove_dir_all(&f.dir);
}

/// Steady load through HAProxy while `fail` takes a Redis master down:
/// no call fails.
async fn no_call_fails_while(f: &Fleet, fail: impl std::future::Future<Output = ()>) -> Report {
    let mut load = f.load(f.lb, 8.0, 8, None);
    load.until_progress(500).await;
    fail.await;
    let report = load.finish().await;
    assert!(report.calls > 1_000, "{report:?}");
    assert!(report.failures.is_empty(), "calls failed: {report:?}");
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_rides_out_a_sentinel_failover() {
    let _one = ONE.lock().await;
    let mut group = common::redis::sentinel_group().await;
    let nodes = vec![group.master.1, group.replica.1];
    let f = fleet_on(Shared::Sentinel(group.urls()), nodes, None).await;
    let report = no_call_fails_while(&f, async {
        group.master.0.start_kill().expect("kill -9 the master");
        group.until_promoted().await;
    })
    .await;
    eprintln!("Sentinel failover under fleet load: {report:?}");
    let _ = std::fs::remove_dir_all(&f.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_rides_out_a_cluster_master_loss() {
    let _one = ONE.lock().await;
    let mut cluster = common::redis::cluster().await;
    let masters = cluster.masters();
    let urls = masters.iter().map(|a| format!("redis://{a}")).collect();
    let nodes = cluster.nodes.iter().map(|(_, a)| *a).collect();
    let f = fleet_on(Shared::Cluster(urls), nodes, None).await;
    let report = no_call_fails_while(&f, async {
        cluster.nodes[1].0.start_kill().expect("kill -9 a master");
        cluster.until_failed_over(masters[0]).await;
    })
    .await;
    eprintln!("Cluster master loss under fleet load: {report:?}");
    let _ = std::fs::remove_dir_all(&f.dir);
}
