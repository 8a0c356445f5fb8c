//! Discovery and balancing against real parts: several `bfb sim` processes
//! on distinct loopback addresses (127.0.0.2–.4 on one port), their names
//! served by a real DNS server (dnsmasq), bfb in process.

mod common;

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use bfb::{
    component::Component,
    config::Config,
    pb::bfb::{
        admin::v1::{
            ListEndpointsRequest, endpoint_admin_service_client::EndpointAdminServiceClient,
            endpoint_status::State,
        },
        common::v1::Completeness,
        customer::v1::{
            GetCustomerRequest, customer_aggregate_service_client::CustomerAggregateServiceClient,
        },
        sim::v1::{
            Behavior, GetStatsRequest, SetBehaviorRequest, sim_control_client::SimControlClient,
        },
    },
};
use common::{Bfb, dns::Dns, metric, millis, sample};
use tokio::time::Instant;
use tonic::{Code, transport::Channel};
use tonic_types::StatusExt;

/// Points every downstream at `endpoint`, resolved by `dns`, re-resolved
/// every 200 ms; the cache off so every call reaches a downstream.
fn discover(c: &mut Config, endpoint: &str, dns: &Dns) {
    for comp in Component::ALL {
        let d = c.downstream_mut(comp).expect("downstream");
        d.endpoint = endpoint.to_string();
    }
    c.discovery.resolver = Some(dns.addr.to_string());
    c.discovery.refresh = Duration::from_millis(200);
    c.discovery.min_interval = Duration::from_millis(50);
    c.cache.enabled = false;
}

async fn bfb(tweak: impl FnOnce(&mut Config)) -> Bfb {
    // The sim address is replaced by `tweak`; any address does.
    common::start_bfb(([127, 0, 0, 1], 9).into(), tweak).await
}

async fn client(bfb: SocketAddr) -> CustomerAggregateServiceClient<Channel> {
    CustomerAggregateServiceClient::new(common::channel(bfb).await)
}

fn get(id: u64) -> GetCustomerRequest {
    GetCustomerRequest {
        customer_id: format!("c-{}", id % 10_000 + 1),
        ..Default::default()
    }
}

/// Persistent control clients (one connection each, so the sims'
/// connection counts see only bfb's connections and these).
struct Controls(Vec<SimControlClient<Channel>>);

impl Controls {
    async fn new(addrs: &[SocketAddr]) -> Controls {
        let mut v = Vec::new();
        for a in addrs {
            v.push(SimControlClient::new(common::channel(*a).await));
        }
        Controls(v)
    }

    /// Profile calls each sim received.
    async fn profile_calls(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for c in &mut self.0 {
            let s = c.get_stats(GetStatsRequest {}).await.expect("stats");
            out.push(s.into_inner().services["profile"].calls);
        }
        out
    }

    async fn connections(&mut self, i: usize) -> u64 {
        self.0[i]
            .get_stats(GetStatsRequest {})
            .await
            .expect("stats")
            .into_inner()
            .connections_accepted
    }

    async fn slow(&mut self, i: usize, ms: u64) {
        for service in ["profile", "favorites", "reviews", "orders"] {
            self.0[i]
                .set_behavior(SetBehaviorRequest {
                    service: service.into(),
                    behavior: Some(Behavior {
                        latency: millis(ms),
                        ..Default::default()
                    }),
                })
                .await
                .expect("set behavior");
        }
    }
}

/// Sends `n` GetCustomer calls, `workers` at a time, ids from `first`;
/// returns each call's latency, failing on any error or degraded answer.
async fn load(bfb: SocketAddr, first: u64, n: u64, workers: u64) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut c = client(bfb).await;
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            let mut i = w;
            while i < n {
                let started = Instant::now();
                let resp = c
                    .get_customer(get(first + i))
                    .await
                    .unwrap_or_else(|e| panic!("call {i}: {e:?}"))
                    .into_inner();
                took.push(started.elapsed());
                let status = resp.status.expect("status");
                assert!(!status.degraded, "call {i} degraded: {status:?}");
                i += workers;
            }
            took
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("worker"));
    }
    all
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_over_replicas_and_shun_a_slow_one() {
    let (_sims, addrs, port) = common::sim_replicas(3).await;
    let hosts: Vec<(String, &str)> = addrs
        .iter()
        .map(|a| (a.ip().to_string(), "replicas.test"))
        .collect();
    let hosts: Vec<(&str, &str)> = hosts.iter().map(|(ip, n)| (ip.as_str(), *n)).collect();
    let dns = Dns::start(&hosts, &[]).await;
    let b = bfb(|c| discover(c, &format!("http://replicas.test:{port}"), &dns)).await;
    let mut control = Controls::new(&addrs).await;

    // 1. Balanced: each replica within ±25 % of a third of 3,000 calls.
    let fast = p50(load(b.addr, 0, 3_000, 8).await);
    let calls = control.profile_calls().await;
    assert_eq!(calls.iter().sum::<u64>(), 3_000, "{calls:?}");
    for c in &calls {
        assert!((750..=1_250).contains(c), "unbalanced: {calls:?}");
    }

    // 2. One replica 50 ms slower: after a short while it gets under 10 %
    //    of calls, and the median stays near the all-fast median (with a
    //    third of each component's calls on it, three in four answers
    //    would wait for it).
    control.slow(2, 50).await;
    load(b.addr, 3_000, 300, 8).await;
    let before = control.profile_calls().await;
    let took = load(b.addr, 3_300, 1_000, 8).await;
    let after = control.profile_calls().await;
    let slow = after[2] - before[2];
    let total: u64 = after.iter().zip(&before).map(|(a, b)| a - b).sum();
    assert_eq!(total, 1_000);
    assert!(slow < 100, "the slow replica got {slow} of 1000 calls");
    let median = p50(took);
    assert!(
        median < fast + Duration::from_millis(25),
        "median {median:?}, all fast {fast:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_is_ejected_and_no_caller_sees_it() {
    let (mut sims, addrs, _) = common::sim_replicas(3).await;
    let endpoints: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let b = bfb(|c| {
        for comp in Component::ALL {
            let d = c.downstream_mut(comp).expect("downstream");
            d.endpoint.clear();
            d.endpoints = endpoints.clone();
        }
        c.cache.enabled = false;
    })
    .await;
    let mut control = Controls::new(&addrs).await;
    load(b.addr, 0, 300, 4).await;

    // Kill replica 1 while 8 workers are sending: every call still succeeds
    // whole (calls in flight on it are retried elsewhere).
    let running = tokio::spawn(load(b.addr, 1_000, 3_000, 8));
    let start = control.profile_calls().await.iter().sum::<u64>();
    loop {
        let now = control.profile_calls().await.iter().sum::<u64>();
        if now >= start + 500 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    sims[1].start_kill().expect("kill -9");
    running.await.expect("no call failed");

    let text = common::http_get(b.metrics, "/metrics").await;
    let target = endpoints.join(",");
    assert!(
        sample(
            &text,
            &format!("bfb_endpoint_ejections_total{{target=\"{target}\"}}")
        ) >= 1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "bfb_breaker_transitions_total{downstream=\"profile\",to=\"open\"}"
        ),
        Some(0.0),
        "the downstream's breaker opened"
    );
    // The admin API shows it ejected, the others ready.
    let mut admin = EndpointAdminServiceClient::new(common::channel(b.admin).await);
    let list = admin
        .list_endpoints(ListEndpointsRequest {
            downstreams: vec!["profile".into()],
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.downstreams.len(), 1);
    let states: BTreeMap<String, i32> = list.downstreams[0]
        .endpoints
        .iter()
        .map(|e| (e.address.clone(), e.state))
        .collect();
    assert_eq!(
        states[&addrs[1].to_string()],
        State::Ejected as i32,
        "{list:?}"
    );
    assert_eq!(
        states[&addrs[0].to_string()],
        State::Ready as i32,
        "{list:?}"
    );
    assert_eq!(
        states[&addrs[2].to_string()],
        State::Ready as i32,
        "{list:?}"
    );
    // An unknown downstream name is a field violation.
    let err = admin
        .list_endpoints(ListEndpointsRequest {
            downstreams: vec!["ordres".into()],
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.get_details_bad_request()
            .expect("bad request")
            .field_violations[0]
            .field,
        "downstreams[0]"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_follows_dns_survives_its_outage_and_fails_fast_without_endpoints() {
    let (_sims, addrs, port) = common::sim_replicas(3).await;
    let ip = |i: usize| addrs[i].ip().to_string();
    let (a, b_, c) = (ip(0), ip(1), ip(2));
    let mut dns = Dns::start(&[(&a, "replicas.test"), (&b_, "replicas.test")], &[]).await;
    let b = bfb(|cfg| discover(cfg, &format!("http://replicas.test:{port}"), &dns)).await;
    let mut control = Controls::new(&addrs).await;
    load(b.addr, 0, 200, 4).await;
    let calls = control.profile_calls().await;
    assert!(calls[0] > 0 && calls[1] > 0 && calls[2] == 0, "{calls:?}");
    let kept = control.connections(1).await;

    // 4. Replica 0 leaves and 2 joins: traffic follows within the refresh
    //    interval; replica 1, unchanged, keeps its connection.
    dns.set_hosts(&[(&b_, "replicas.test"), (&c, "replicas.test")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        load(b.addr, 200, 20, 2).await;
        if control.profile_calls().await[2] > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "replica 2 never got a call");
    }
    let before = control.profile_calls().await;
    load(b.addr, 400, 200, 4).await;
    let after = control.profile_calls().await;
    assert_eq!(after[0], before[0], "the removed replica still gets calls");
    assert!(after[1] > before[1] && after[2] > before[2], "{after:?}");
    assert_eq!(
        control.connections(1).await,
        kept,
        "the unchanged replica was reconnected"
    );

    // 5. The DNS server goes away: the last good set keeps serving.
    dns.stop();
    let errors = "bfb_dns_resolutions_total{name=\"replicas.test\",result=\"error\"}";
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&common::http_get(b.metrics, "/metrics").await, errors).unwrap_or(0.0) < 2.0 {
        assert!(Instant::now() < deadline, "no failed resolutions counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    load(b.addr, 600, 200, 4).await;

    // 6. Every endpoint gone (the name no longer exists, said twice): calls
    //    fail at once with NO_ENDPOINTS, and recover when one returns.
    let dns = Dns::start(&[], &[]).await;
    let b = bfb(|cfg| discover(cfg, &format!("http://gone.test:{port}"), &dns)).await;
    let mut client = client(b.addr).await;
    let mut took = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let err = client
            .get_customer(GetCustomerRequest {
                customer_id: "c-1".into(),
                completeness: Completeness::All as i32,
                ..Default::default()
            })
            .await
            .expect_err("no endpoints");
        took.push(started.elapsed());
        assert_eq!(err.code(), Code::Unavailable);
        assert_eq!(
            err.get_details_error_info().expect("info").reason,
            "NO_ENDPOINTS"
        );
    }
    let median = p50(took);
    assert!(median < Duration::from_millis(50), "took {median:?}");
    dns.set_hosts(&[(&a, "gone.test")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get_customer(get(1)).await.is_err() {
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_targets_and_their_ports() {
    let p1 = common::dns::free_port("127.0.0.2");
    let p2 = common::dns::free_port("127.0.0.3");
    let (_s1, a1) = common::sim_process(&format!("127.0.0.2:{p1}"), &[]).await;
    let (_s2, a2) = common::sim_process(&format!("127.0.0.3:{p2}"), &[]).await;
    let dns = Dns::start(
        &[("127.0.0.2", "one.test"), ("127.0.0.3", "two.test")],
        &[
            ("_grpc._tcp.replicas.test", "one.test", p1),
            ("_grpc._tcp.replicas.test", "two.test", p2),
        ],
    )
    .await;
    let b = bfb(|c| discover(c, "dns+srv://_grpc._tcp.replicas.test", &dns)).await;
    load(b.addr, 0, 200, 4).await;
    let calls = Controls::new(&[a1, a2]).await.profile_calls().await;
    assert!(calls[0] > 20 && calls[1] > 20, "{calls:?}");
    assert_eq!(calls[0] + calls[1], 200);
}
