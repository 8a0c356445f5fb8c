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
