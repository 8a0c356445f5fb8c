//! Real Redis processes for the cache tests: `redis-server` (installed by
//! scripts/install-test-tools.sh) as a server, a replica, a sentinel or a
//! cluster node, on free loopback ports, without persistence.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};

/// A free TCP port on 127.0.0.1 (nothing holds it after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `n` distinct free TCP ports on 127.0.0.1: all held until all are found,
/// so none repeats.
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

/// `redis-server` on `port` with `args` (a config file first, if any),
/// once it accepts connections.
pub async fn server_on(port: u16, args: &[&str]) -> (Child, SocketAddr) {
    let bin = std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
    // Its own working directory: redis-server loads a dump.rdb it finds in
    // its directory, and a cluster node writes its nodes file there.
    let dir = std::env::temp_dir().join(format!("bfb-redis-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("redis dir");
    let child = Command::new(&bin)
        .args(args)
        .arg("--dir")
        .arg(&dir)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {bin} (make test installs it): {e}"));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let until = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < until, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, addr)
}

/// `redis-server` on a free port.
pub async fn server(args: &[&str]) -> (Child, SocketAddr) {
    server_on(free_port(), args).await
}

/// Runs `cmd` on the node at `addr` (no cluster routing).
pub async fn query<T: redis::FromRedisValue>(
    addr: SocketAddr,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://{addr}"))?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    cmd.query_async(&mut conn).await
}

/// Waits (bounded: `secs`) until `f` holds.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> F,
) {
    let until = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Redis master with one synced replica, watched by three sentinels
/// (quorum 2, down after 1 s) under the name `bfb`.
pub struct SentinelGroup {
    pub master: (Child, SocketAddr),
    pub replica: (Child, SocketAddr),
    pub sentinels: Vec<(Child, SocketAddr)>,
    dir: std::path::PathBuf,
}

/// Starts a [`SentinelGroup`] and waits (bounded) until it can fail over.
pub async fn sentinel_group() -> SentinelGroup {
    let ports = free_ports(5);
    let master = server_on(ports[0], &["--repl-diskless-sync-delay", "0"]).await;
    let replica = server_on(
        ports[1],
        &["--replicaof", "127.0.0.1", &ports[0].to_string()],
    )
    .await;
    let raddr = replica.1;
    eventually("the replica to sync", 30, || async move {
        query::<String>(raddr, redis::cmd("INFO").arg("replication"))
            .await
            .is_ok_and(|i| i.contains("master_link_status:up"))
    })
    .await;
    let dir =
        std::env::temp_dir().join(format!("bfb-sentinel-{}-{}", std::process::id(), ports[0]));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut sentinels = Vec::new();
    for (i, &port) in ports[2..].iter().enumerate() {
        let conf = dir.join(format!("sentinel-{i}.conf"));
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor bfb 127.0.0.1 {} 2\n\
                 sentinel down-after-milliseconds bfb 1000\n\
                 sentinel failover-timeout bfb 5000\n\
                 sentinel parallel-syncs bfb 1\n",
                ports[0]
            ),
        )
        .expect("sentinel conf");
        let conf = conf.to_string_lossy().into_owned();
        sentinels.push(server_on(port, &[&conf, "--sentinel"]).await);
    }
    // The sentinels have found the replica (needed for a failover).
    let s0 = sentinels[0].1;
    eventually("the sentinels to see the replica", 30, || async move {
        query::<Vec<redis::Value>>(s0, redis::cmd("SENTINEL").arg("REPLICAS").arg("bfb"))
            .await
            .is_ok_and(|r| !r.is_empty())
    })
    .await;
    SentinelGroup {
        master,
        replica,
        sentinels,
        dir,
    }
}

impl SentinelGroup {
    /// The sentinels' URLs, for `cache.redis_sentinel`.
    pub fn urls(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|(_, a)| format!("redis://{a}"))
            .collect()
    }

    /// Waits (bounded) until the sentinels name the replica as master.
    pub async fn until_promoted(&self) {
        let (s0, replica) = (self.sentinels[0].1, self.replica.1);
        eventually("the sentinels to promote the replica", 30, || async move {
            query::<Vec<String>>(
                s0,
                redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg("bfb"),
            )
            .await
            .is_ok_and(|a| a.get(1) == Some(&replica.port().to_string()))
        })
        .await;
    }
}

impl Drop for SentinelGroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters (the first three nodes) with a synced
/// replica each, failing over after 1 s.
pub struct Cluster {
    pub nodes: Vec<(Child, SocketAddr)>,
    dir: std::path::PathBuf,
}

/// Starts a [`Cluster`] (`redis-cli --cluster create`) and waits (bounded)
/// until it serves and can fail over.
pub async fn cluster() -> Cluster {
    // Data ports and cluster bus ports (by default port + 10000, which may
    // be taken or past 65535 for a random port).
    let ports = free_ports(12);
    let dir = std::env::temp_dir().join(format!("bfb-cluster-{}-{}", std::process::id(), ports[0]));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut nodes = Vec::new();
    for (port, bus) in ports[..6].iter().zip(&ports[6..]) {
        let conf = dir.join(format!("nodes-{port}.conf"));
        let conf = conf.to_string_lossy().into_owned();
        let bus = bus.to_string();
        let args = [
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &bus,
            "--cluster-config-file",
            &conf,
            "--cluster-node-timeout",
            "1000",
            // Sync replicas at once (Redis waits 5 s by default to batch
            // them): an unsynced replica never takes over.
            "--repl-diskless-sync-delay",
            "0",
        ];
        nodes.push(server_on(*port, &args).await);
    }
    let addrs: Vec<String> = nodes.iter().map(|(_, a)| a.to_string()).collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()
        .await
        .expect("redis-cli (make test installs it)");
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stdout)
    );
    for (_, a) in &nodes {
        let a = *a;
        eventually("the cluster to be ready", 30, || async move {
            query::<String>(a, redis::cmd("CLUSTER").arg("INFO"))
                .await
                .is_ok_and(|i| i.contains("cluster_state:ok"))
        })
        .await;
        // Every replica has synced with its master (else it cannot take over).
        eventually("the replicas to sync", 30, || async move {
            query::<String>(a, redis::cmd("INFO").arg("replication"))
                .await
                .is_ok_and(|i| i.contains("role:master") || i.contains("master_link_status:up"))
        })
        .await;
    }
    Cluster { nodes, dir }
}

impl Cluster {
    /// The masters `redis-cli` made: the first three nodes.
    pub fn masters(&self) -> Vec<SocketAddr> {
        self.nodes[..3].iter().map(|(_, a)| *a).collect()
    }

    /// Waits (bounded) until `survivor` sees the cluster whole again, with
    /// three masters up.
    pub async fn until_failed_over(&self, survivor: SocketAddr) {
        eventually("the cluster to fail over", 30, || async move {
            query::<String>(survivor, redis::cmd("CLUSTER").arg("INFO"))
                .await
                .is_ok_and(|i| i.contains("cluster_state:ok"))
                && query::<String>(survivor, redis::cmd("CLUSTER").arg("NODES"))
                    .await
                    .is_ok_and(|n| {
                        n.lines()
                            .filter(|l| l.contains("master") && !l.contains("fail"))
                            .count()
                            == 3
                    })
        })
        .await;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
