//! Helpers shared by the benches: bfb and sim as separate processes pinned
//! to one core, and latency recording.

#![allow(dead_code)]

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use bfb::pb::bfb::customer::v1::{
    GetCustomerRequest, customer_aggregate_service_client::CustomerAggregateServiceClient,
};

use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use tonic::transport::Channel;

/// The bfb binary of this build.
pub const BFB: &str = env!("CARGO_BIN_EXE_bfb");

pub type Boxed = Box<dyn std::error::Error>;

/// Spawns `bfb ARGS` (pinned to core 1 when possible) and reads the address
/// it prints.
pub async fn spawn(args: &[&str]) -> Result<(Child, SocketAddr), Boxed> {
    spawn_program(BFB, args).await
}

/// Spawns `program ARGS` (pinned to core 1 when possible) with
/// `RUST_LOG=warn` and reads the address it prints last on its first line
/// (`... listening on ADDR`).
pub async fn spawn_program(program: &str, args: &[&str]) -> Result<(Child, SocketAddr), Boxed> {
    spawn_logging(program, args, Some("warn")).await
}

/// [`spawn_program`] with `RUST_LOG` set to `log`, or unset (`None`: the
/// config's log filter decides, as in production). Logs go to /dev/null:
/// formatted and written, as to a collector's pipe, but not shown.
pub async fn spawn_logging(
    program: &str,
    args: &[&str],
    log: Option<&str>,
) -> Result<(Child, SocketAddr), Boxed> {
    let pinned = std::process::Command::new("taskset")
        .arg("-V")
        .output()
        .is_ok();
    // BENCH_WRAP=SCRIPT runs every program through SCRIPT (a profiler).
    let wrap = std::env::var("BENCH_WRAP").ok();
    let args: Vec<&str> = match &wrap {
        Some(_) => std::iter::once(program)
            .chain(args.iter().copied())
            .collect(),
        None => args.to_vec(),
    };
    let program = wrap.as_deref().unwrap_or(program);
    let mut cmd = if pinned {
        let mut c = Command::new("taskset");
        c.args(["-c", "1", program]);
        c
    } else {
        Command::new(program)
    };
    match log {
        Some(level) => cmd.env("RUST_LOG", level),
        None => cmd.env_remove("RUST_LOG"),
    };
    let mut child = cmd
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // The first line that says where it listens (a wrapper such as a
    // profiler may print before it).
    let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    while !line.contains("listening on") {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Err(format!("{program} exited before listening").into());
        }
    }
    let addr = line
        .trim()
        .rsplit(' ')
        .next()
        .ok_or("no address")?
        .parse()?;
    Ok((child, addr))
}

/// CPU time (user + system) process `pid` has used so far.
pub fn cpu_of(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports these in USER_HZ, which is 100 on every mainstream platform.
    Some(std::time::Duration::from_millis(ticks * 10))
}

/// CPU time a child process has used so far (zero once it is gone).
pub fn cpu_time(child: &Child) -> std::time::Duration {
    child.id().and_then(cpu_of).unwrap_or_default()
}

/// VmRSS of a child process, in KiB (0 once it is gone).
pub fn rss_kib(child: &Child) -> u64 {
    let Some(pid) = child.id() else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Calls in flight at the sim, over all its services.
pub async fn sim_in_flight(sim: SocketAddr) -> Result<u64, Boxed> {
    use bfb::pb::bfb::sim::v1::{GetStatsRequest, sim_control_client::SimControlClient};
    let stats = SimControlClient::new(channel(sim).await?)
        .get_stats(GetStatsRequest {})
        .await?
        .into_inner();
    Ok(stats.services.values().map(|s| s.in_flight).sum())
}

/// The number in environment variable `name` (a bench's knob), or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Starts `bfb sim` with every service at `latency`.
pub async fn start_sim(latency: &str) -> Result<(Child, SocketAddr), Boxed> {
    spawn(&["sim", "--listen", "127.0.0.1:0", "--latency", latency]).await
}

/// Starts `bfb serve` on the example config pointed at `sim`, after `edit`
/// changes the config text.
pub async fn start_bfb(
    sim: SocketAddr,
    name: &str,
    edit: impl FnOnce(String) -> String,
) -> Result<(Child, SocketAddr), Boxed> {
    start_bfb_from(BFB, Some("warn"), sim, name, edit).await
}

/// [`start_bfb`] from the binary `program` (another build, for before and
/// after in one run), with `RUST_LOG` as in [`spawn_logging`].
pub async fn start_bfb_from(
    program: &str,
    log: Option<&str>,
    sim: SocketAddr,
    name: &str,
    edit: impl FnOnce(String) -> String,
) -> Result<(Child, SocketAddr), Boxed> {
    let config = bfb::config::EXAMPLE
        .replace("http://127.0.0.1:50061", &format!("http://{sim}"))
        .replace("listen = \"127.0.0.1:50051\"", "listen = \"127.0.0.1:0\"")
        .replace(
            "metrics_listen = \"127.0.0.1:9464\"",
            "metrics_listen = \"127.0.0.1:0\"",
        )
        .replace(
            "admin_listen = \"127.0.0.1:50052\"",
            "admin_listen = \"127.0.0.1:0\"",
        );
    let path = std::env::temp_dir().join(format!("bfb-bench-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, edit(config))?;
    spawn_logging(
        program,
        &["serve", "--config", path.to_str().ok_or("path")?],
        log,
    )
    .await
}

/// A sim at `sim_latency` and bfb on the example config.
pub async fn start(sim_latency: &str) -> Result<(Child, Child, SocketAddr, SocketAddr), Boxed> {
    let (sim, sim_addr) = start_sim(sim_latency).await?;
    let (bfb, bfb_addr) = start_bfb(sim_addr, "default", |c| c).await?;
    Ok((sim, bfb, sim_addr, bfb_addr))
}

pub async fn channel(addr: SocketAddr) -> Result<Channel, Boxed> {
    Ok(Channel::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// `n` calls of `f` one after another; the latency histogram in µs.
pub async fn sequential<F, Fut, E>(n: u64, mut f: F) -> Result<Histogram<u64>, Boxed>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::error::Error + 'static,
{
    let mut h = Histogram::new(3)?;
    for i in 0..n {
        let t = Instant::now();
        f(i).await?;
        h.record(t.elapsed().as_micros() as u64)?;
    }
    Ok(h)
}

/// Prints one latency row.
pub fn row(name: &str, h: &Histogram<u64>) {
    println!(
        "  {name:<36} p50 {:>7} µs   p99 {:>7} µs   p99.9 {:>7} µs   ({} calls)",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.len()
    );
}

/// RSS growth per call (KiB) of `server` with `n` GetCustomer held at a
/// slow sim (all 4n downstream calls counted there, not guessed with a
/// sleep), 100 calls per client connection, and its RSS then (KiB); then
/// lets them finish.
pub async fn per_call_kib(
    server: &Child,
    addr: SocketAddr,
    sim: SocketAddr,
    n: u64,
) -> Result<(f64, u64), Boxed> {
    let idle = rss_kib(server);
    let mut clients = Vec::new();
    for _ in 0..n.div_ceil(100) {
        clients.push(CustomerAggregateServiceClient::new(channel(addr).await?));
    }
    let start = sim_in_flight(sim).await?;
    let mut tasks = Vec::new();
    for i in 0..n {
        let mut c = clients[(i / 100) as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut r = tonic::Request::new(GetCustomerRequest {
                customer_id: format!("c-{}", i % 10_000 + 1),
                ..Default::default()
            });
            r.set_timeout(Duration::from_secs(30));
            c.get_customer(r).await.map(drop)
        }));
    }
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = sim_in_flight(sim).await?;
        if seen >= start + 4 * n {
            break;
        }
        if Instant::now() > until {
            return Err(
                format!("only {seen} of {} downstream calls reached the sim", 4 * n).into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let busy = rss_kib(server);
    for t in tasks {
        t.await??;
    }
    Ok((busy.saturating_sub(idle) as f64 / n as f64, busy))
}
