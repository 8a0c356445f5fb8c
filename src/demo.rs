//! `bfb demo`: the simulated services and bfb in one process, on the embedded
//! default config, with a few `grpcurl` commands to try.

use std::{net::SocketAddr, time::Duration};

use tokio::net::TcpListener;

use crate::{
    config::Config,
    sim::{self, SimConfig, state::Behavior},
};

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The embedded config is invalid (a unit test prevents this).
    #[error("embedded config: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// An address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A server failed.
    #[error(transparent)]
    Serve(#[from] crate::server::ServeError),
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, DemoError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DemoError::Bind { addr, source })
}

/// Where the demo listens.
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    /// bfb's API.
    pub bfb: SocketAddr,
    /// The simulated services (the first replica; further replicas on the
    /// next ports, or each on its own free port when this port is 0).
    pub sim: SocketAddr,
    /// Replicas of the simulated services, balanced over by bfb.
    pub replicas: u16,
    /// bfb's admin API (skipped if taken).
    pub admin: SocketAddr,
}

/// Runs the demo until `shutdown` completes.
pub async fn run(
    addrs: Addrs,
    sim_latency: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DemoError> {
    let Addrs {
        bfb: listen,
        sim: sim_listen,
        admin: admin_listen,
        replicas,
    } = addrs;
    let mut sims = Vec::new();
    for i in 0..replicas.max(1) {
        let mut addr = sim_listen;
        if addr.port() != 0 {
            addr.set_port(addr.port().saturating_add(i));
        }
        let listener = bind(addr).await?;
        let local = listener
            .local_addr()
            .map_err(|source| DemoError::Bind { addr, source })?;
        sims.push((listener, local));
    }
    let sim_addrs: Vec<SocketAddr> = sims.iter().map(|(_, a)| *a).collect();
    let sim_addr = sim_addrs[0];
    let bfb_listener = bind(listen).await?;
    let bfb_addr = bfb_listener
        .local_addr()
        .map_err(|source| DemoError::Bind {
            addr: listen,
            source,
        })?;

    let endpoints: Vec<String> = sim_addrs.iter().map(|a| format!("http://{a}")).collect();
    let mut config = Config::example()?.with_all_endpoints(&endpoints);
    config.listen = bfb_addr;
    // Ctrl-C should stop a demo at once; there is no load balancer to tell.
    config.server.drain_delay = Duration::ZERO;
    config.server.shutdown_grace = Duration::from_secs(1);
    // The metrics endpoint is a nice-to-have here: skip it if its port is taken.
    let metrics = match config.telemetry.metrics_listen {
        Some(addr) => TcpListener::bind(addr).await.ok(),
        None => None,
    };
    let metrics_addr = metrics.as_ref().and_then(|l| l.local_addr().ok());
    let admin = TcpListener::bind(admin_listen).await.ok();
    let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
    let sim_config = SimConfig {
        behavior: Behavior {
            latency: sim_latency,
            ..Behavior::default()
        },
        ..SimConfig::default()
    };

    // Written without println!, which panics when stdout is a closed pipe.
    let mut text = instructions(bfb_addr, sim_addr, sim_latency);
    if let [_, second, ..] = sim_addrs[..] {
        text.push_str(&replica_instructions(
            bfb_addr, &sim_addrs, second, admin_addr,
        ));
    }
    if let Some(admin) = admin_addr {
        text.push_str(&format!(
            "\n\nAdmin API on {admin}: drop an entity's cached answers (both tiers, all replicas),\n\
             and list each downstream's endpoints with their state, latency estimate and load:\n\n  \
             grpcurl -plaintext -d '{{\"entity_id\":\"c-42\"}}' {admin} bfb.admin.v1.CacheAdmin/InvalidateEntity\n  \
             grpcurl -plaintext -d '{{\"downstreams\":[\"orders\"]}}' {admin} bfb.admin.v1.EndpointAdminService/ListEndpoints"
        ));
    }
    if let Some(addr) = metrics_addr {
        text.push_str(&format!(
            "\nMetrics: curl -s http://{addr}/metrics | grep ^bfb_"
        ));
    }
    {
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), "{text}");
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let stopped = |mut rx: tokio::sync::watch::Receiver<()>| async move {
        let _ = rx.changed().await;
    };
    let sim =
        futures::future::try_join_all(sims.into_iter().map(|(listener, _)| {
            sim::serve(sim_config.clone(), listener, stopped(stop_rx.clone()))
        }));
    let listeners = crate::server::Listeners {
        grpc: bfb_listener,
        metrics,
        admin,
        health: None,
    };
    let bfb = crate::server::serve(&config, listeners, stopped(stop_rx));
    let trigger = async move {
        shutdown.await;
        let _ = stop_tx.send(());
    };
    let (sim, bfb, ()) = tokio::join!(sim, bfb, trigger);
    sim?;
    bfb?;
    Ok(())
}

fn replica_instructions(
    bfb: SocketAddr,
    sims: &[SocketAddr],
    slow: SocketAddr,
    admin: Option<SocketAddr>,
) -> String {
    let list = sims
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let watch = admin.map_or(String::new(), |admin| {
        format!(
            "\n  grpcurl -plaintext -d '{{\"downstreams\":[\"orders\"]}}' {admin} bfb.admin.v1.EndpointAdminService/ListEndpoints"
        )
    });
    format!(
        r#"

{n} replicas of the simulated services ({list}); bfb spreads its calls over
them (power of two choices over latency). Make one replica slow, send a few
calls, and watch it get few of them:

  grpcurl -plaintext -d '{{"service":"orders","behavior":{{"latency":"0.2s"}}}}' {slow} bfb.sim.v1.SimControl/SetBehavior
  grpcurl -plaintext -d '{{"customer_id":"c-43"}}' {bfb} bfb.customer.v1.CustomerAggregateService/GetCustomer{watch}"#,
        n = sims.len()
    )
}

fn instructions(bfb: SocketAddr, sim: SocketAddr, latency: Duration) -> String {
    let latency = humantime::format_duration(latency);
    format!(
        r#"bfb demo: bfb on {bfb}, simulated downstream services on {sim} (latency {latency} each).

Try (grpcurl, through server reflection):

  grpcurl -plaintext {bfb} list
  grpcurl -plaintext {bfb} describe bfb.customer.v1.GetCustomerRequest
  grpcurl -plaintext -d '{{"customer_id":"c-42"}}' {bfb} bfb.customer.v1.CustomerAggregateService/GetCustomer
  grpcurl -plaintext -d '{{"customer_id":"c-42","read_mask":{{"paths":["profile","orders"]}}}}' {bfb} bfb.customer.v1.CustomerAggregateService/GetCustomer
  grpcurl -plaintext -d '{{"user_id":"u-7"}}' {bfb} bfb.activity.v1.UserActivityService/GetUserActivity

Many at once: a batch (one result per id, each with its own status) and a
stream of users (a list of ids, or a numbered range):

  grpcurl -plaintext -d '{{"customer_ids":["c-1","c-2","c-999999999"],"read_mask":{{"paths":["profile"]}}}}' {bfb} bfb.customer.v1.CustomerAggregateService/BatchGetCustomers
  grpcurl -plaintext -d '{{"user_range":{{"prefix":"u-","first":1,"count":3}}}}' {bfb} bfb.activity.v1.UserActivityService/StreamUserActivity

The v2 contract pages long lists: pass the answer's next_page_token as
orders_page.page_token for the next page.

  grpcurl -plaintext -d '{{"customer_id":"c-42","read_mask":{{"paths":["orders"]}},"orders_page":{{"page_size":2}}}}' {bfb} bfb.customer.v2.CustomerAggregateService/GetCustomer
  grpcurl -plaintext -d '{{"service":"bfb.customer.v1.CustomerAggregateService"}}' {bfb} grpc.health.v1.Health/Check

Inject a fault: make the orders service fail every call, then ask again and
watch "orders" turn to ERROR/UNAVAILABLE in the status while the rest is served
(or ask with "completeness":"COMPLETENESS_ALL" and watch the call fail):

  grpcurl -plaintext -d '{{"service":"orders","behavior":{{"error_rate":1}}}}' {sim} bfb.sim.v1.SimControl/SetBehavior
  grpcurl -plaintext -d '{{"customer_id":"c-42"}}' {bfb} bfb.customer.v1.CustomerAggregateService/GetCustomer
  grpcurl -plaintext -d '{{"customer_id":"c-42","completeness":"COMPLETENESS_ALL"}}' {bfb} bfb.customer.v1.CustomerAggregateService/GetCustomer
  grpcurl -plaintext {sim} bfb.sim.v1.SimControl/GetStats
  grpcurl -plaintext {sim} bfb.sim.v1.SimControl/Reset

Deadlines: a deadline shorter than the simulated latency ends in DEADLINE_EXCEEDED:

  grpcurl -plaintext -max-time 0.01 -d '{{"customer_id":"c-42"}}' {bfb} bfb.customer.v1.CustomerAggregateService/GetCustomer

Ctrl-C stops the demo."#
    )
}
