//! `make bench`: bfb against the code a team would write by hand instead —
//! a plain tonic server whose GetCustomer joins the four generated clients
//! (`tokio::join!`), propagates the caller's deadline and maps the answers;
//! no resilience, cache, auth or telemetry. Both serve the same contract
//! from their own process, pinned to core 1 with the sim, and are measured
//! in the same run, in alternating rounds:
//!
//! - CPU per GetCustomer (the server process's user + system time) and
//!   calls/s in a closed loop at concurrency 32, `BENCH_SECS` (default 3)
//!   per round, `BENCH_ROUNDS` (default 4) rounds each;
//! - p50 at concurrency 1;
//! - memory per in-flight GetCustomer: RSS growth with 40 calls held at a
//!   sim answering in 3 s (the baseline's single connection carries at most
//!   the sim's 200 streams; `benches/memory.rs` measures bfb at 2,000).
//!
//! The baseline runs from this same binary (`baseline serve-baseline ADDR
//! SIM`), so it is built with the same profile and dependencies.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bfb::pb::{
    bfb::customer::v1::{
        BatchGetCustomersRequest, BatchGetCustomersResponse, Customer, Favorite, Favorites,
        GetCustomerRequest, GetCustomerResponse, Order, OrderTotals, Orders, Profile, Review,
        ReviewSummary, Reviews,
        customer_aggregate_service_client::CustomerAggregateServiceClient,
        customer_aggregate_service_server::{
            CustomerAggregateService, CustomerAggregateServiceServer,
        },
    },
    downstream::{
        favorites::v1::{ListFavoritesRequest, favorites_service_client::FavoritesServiceClient},
        orders::v1::{ListOrdersRequest, orders_service_client::OrdersServiceClient},
        profile::v1::{GetProfileRequest, profile_service_client::ProfileServiceClient},
        reviews::v1::{ListReviewsRequest, reviews_service_client::ReviewsServiceClient},
    },
};
use tokio::process::Child;
use tonic::{Request, Response, Status, transport::Channel};

mod common;

use common::{
    Boxed, channel, cpu_time, env_or, rss_kib, sim_in_flight, spawn_program, start_bfb, start_sim,
};

/// The hand-written aggregator.
struct Baseline {
    profile: ProfileServiceClient<Channel>,
    favorites: FavoritesServiceClient<Channel>,
    reviews: ReviewsServiceClient<Channel>,
    orders: OrdersServiceClient<Channel>,
}

/// The caller's deadline on a downstream request, as a team would pass it.
fn with_deadline<T>(msg: T, timeout: Option<Duration>) -> Request<T> {
    let mut r = Request::new(msg);
    if let Some(t) = timeout {
        r.set_timeout(t);
    }
    r
}

/// `grpc-timeout` of an inbound request (bfb's parser: any team would use
/// one like it).
fn timeout_of<T>(r: &Request<T>) -> Option<Duration> {
    bfb::deadline::parse_grpc_timeout(r.metadata().get("grpc-timeout")?.to_str().ok()?)
}

#[tonic::async_trait]
impl CustomerAggregateService for Baseline {
    async fn get_customer(
        &self,
        request: Request<GetCustomerRequest>,
    ) -> Result<Response<GetCustomerResponse>, Status> {
        let t = timeout_of(&request);
        let id = request.into_inner().customer_id;
        let (mut p, mut f, mut r, mut o) = (
            self.profile.clone(),
            self.favorites.clone(),
            self.reviews.clone(),
            self.orders.clone(),
        );
        let (profile, favorites, reviews, orders) = tokio::join!(
            p.get_profile(with_deadline(
                GetProfileRequest {
                    customer_id: id.clone()
                },
                t
            )),
            f.list_favorites(with_deadline(
                ListFavoritesRequest {
                    customer_id: id.clone()
                },
                t
            )),
            r.list_reviews(with_deadline(
                ListReviewsRequest {
                    customer_id: id.clone()
                },
                t
            )),
            o.list_orders(with_deadline(
                ListOrdersRequest {
                    customer_id: id.clone()
                },
                t
            )),
        );
        let profile = profile?.into_inner().profile.map(|p| Profile {
            display_name: p.display_name,
            email: p.email,
            tier: p.tier,
            country_code: p.country_code,
            created_at: p.created_at,
        });
        let favorites = Favorites {
            items: favorites?
                .into_inner()
                .favorites
                .into_iter()
                .map(|f| Favorite {
                    product_id: f.product_id,
                    product_name: f.product_name,
                    added_at: f.added_at,
                })
                .collect(),
        };
        let all = reviews?.into_inner().reviews;
        let sum: i64 = all.iter().map(|r| i64::from(r.rating)).sum();
        let count = all.len();
        let reviews = Reviews {
            summary: Some(ReviewSummary {
                count: count as i32,
                average_rating: if count == 0 {
                    0.0
                } else {
                    sum as f64 / count as f64
                },
            }),
            recent: all
                .into_iter()
                .take(10)
                .map(|r| Review {
                    review_id: r.review_id,
                    product_id: r.product_id,
                    rating: r.rating,
                    title: r.title,
                    created_at: r.created_at,
                })
                .collect(),
        };
        let all = orders?.into_inner().orders;
        let currency = all
            .first()
            .map(|o| o.currency_code.clone())
            .unwrap_or_default();
        let total: i64 = all
            .iter()
            .filter(|o| o.currency_code == currency)
            .map(|o| o.total_minor)
            .sum();
        let orders = Orders {
            totals: Some(OrderTotals {
                count: all.len() as i32,
                total_spent: total as f64 / 100.0,
                currency_code: currency,
            }),
            recent: all
                .into_iter()
                .take(10)
                .map(|o| Order {
                    order_id: o.order_id,
                    status: o.status.to_string(),
                    total: o.total_minor as f64 / 100.0,
                    currency_code: o.currency_code,
                    placed_at: o.placed_at,
                })
                .collect(),
        };
        Ok(Response::new(GetCustomerResponse {
            customer: Some(Customer {
                customer_id: id,
                profile,
                favorites: Some(favorites),
                reviews: Some(reviews),
                orders: Some(orders),
            }),
            status: None,
        }))
    }

    async fn batch_get_customers(
        &self,
        _: Request<BatchGetCustomersRequest>,
    ) -> Result<Response<BatchGetCustomersResponse>, Status> {
        Err(Status::unimplemented("not in the baseline"))
    }
}

/// The baseline server: `serve-baseline ADDR SIM`; prints `listening on
/// ADDR` like `bfb serve`.
async fn serve_baseline(listen: &str, sim: &str) -> Result<(), Boxed> {
    let ch = Channel::from_shared(format!("http://{sim}"))?
        .tcp_nodelay(true)
        .connect_lazy();
    let service = Baseline {
        profile: ProfileServiceClient::new(ch.clone()),
        favorites: FavoritesServiceClient::new(ch.clone()),
        reviews: ReviewsServiceClient::new(ch.clone()),
        orders: OrdersServiceClient::new(ch),
    };
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("baseline listening on {}", listener.local_addr()?);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(CustomerAggregateServiceServer::new(service))
        .serve_with_incoming(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
        )
        .await?;
    Ok(())
}

fn get(i: u64) -> GetCustomerRequest {
    GetCustomerRequest {
        customer_id: format!("c-{}", i % 10_000 + 1),
        ..Default::default()
    }
}

/// Closed loop at `concurrency` for `secs`: (server CPU µs per call, calls/s).
async fn load(
    server: &Child,
    addr: SocketAddr,
    concurrency: u64,
    secs: f64,
) -> Result<(f64, f64), Boxed> {
    let client = CustomerAggregateServiceClient::new(channel(addr).await?);
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let before = cpu_time(server);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                c.get_customer(get(w * 100_000 + n)).await?;
                n += 1;
            }
            Ok::<u64, Status>(n)
        }));
    }
    let mut calls = 0;
    for t in tasks {
        calls += t.await??;
    }
    let wall = started.elapsed().as_secs_f64();
    let used = (cpu_time(server) - before).as_secs_f64();
    Ok((used * 1e6 / calls as f64, calls as f64 / wall))
}

/// p50 in µs of `n` sequential calls.
async fn p50(addr: SocketAddr, n: u64) -> Result<f64, Boxed> {
    let mut c = CustomerAggregateServiceClient::new(channel(addr).await?);
    let mut took = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        c.get_customer(get(i)).await?;
        took.push(t.elapsed().as_secs_f64() * 1e6);
    }
    took.sort_by(f64::total_cmp);
    Ok(took[took.len() / 2])
}

/// RSS growth per call with `n` calls held at a slow sim (counted there).
async fn per_call_kib(
    server: &Child,
    addr: SocketAddr,
    sim: SocketAddr,
    n: u64,
) -> Result<f64, Boxed> {
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
            let mut r = Request::new(get(i));
            r.set_timeout(Duration::from_secs(20));
            c.get_customer(r).await.map(drop)
        }));
    }
    let until = Instant::now() + Duration::from_secs(20);
    while sim_in_flight(sim).await? < start + 4 * n {
        if Instant::now() > until {
            return Err("the calls never all reached the sim".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let busy = rss_kib(server);
    for t in tasks {
        t.await??;
    }
    Ok(busy.saturating_sub(idle) as f64 / n as f64)
}

fn spread(mut v: Vec<f64>) -> String {
    v.sort_by(f64::total_cmp);
    format!(
        "{:.0} / {:.0} / {:.0}",
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    )
}

/// bfb's config for the comparison: bulkheads and admission raised (the
/// baseline has none), slow calls not counted by the breaker.
fn roomy(c: String) -> String {
    c.replace("max_concurrency = 100", "max_concurrency = 20000")
        .replace("max_concurrent_rpcs = 1000", "max_concurrent_rpcs = 20000")
        .replace("timeout = \"1s\"", "timeout = \"10s\"")
        .replace("slow_call = \"1s\"", "slow_call = \"30s\"")
}

async fn baseline_process(sim: SocketAddr) -> Result<(Child, SocketAddr), Boxed> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().ok_or("path")?.to_string();
    let sim = sim.to_string();
    spawn_program(&exe, &["serve-baseline", "127.0.0.1:0", &sim]).await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Boxed> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve-baseline") {
        let (listen, sim) = (&args[2], &args[3]);
        return serve_baseline(listen, sim).await;
    }
    let secs: f64 = env_or("BENCH_SECS", 3.0);
    let rounds: usize = env_or("BENCH_ROUNDS", 4);

    let (_sim, sim) = start_sim("0ms").await?;
    let (bfb, bfb_addr) = start_bfb(sim, "baseline-cmp", roomy).await?;
    let (base, base_addr) = baseline_process(sim).await?;
    let targets = [("hand-written", &base, base_addr), ("bfb", &bfb, bfb_addr)];
    for (_, s, a) in &targets {
        load(s, *a, 32, 0.5).await?;
    }
    let mut cpu_us = [Vec::new(), Vec::new()];
    let mut rate = [Vec::new(), Vec::new()];
    let mut lat = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for k in 0..2 {
            let i = (round + k) % 2;
            let (_, s, a) = targets[i];
            let (c, r) = load(s, a, 32, secs).await?;
            cpu_us[i].push(c);
            rate[i].push(r);
            lat[i].push(p50(a, 300).await?);
        }
    }
    println!(
        "GetCustomer (4 components), zero-latency sim, {rounds} alternating rounds, min / median / max"
    );
    println!(
        "{:<14} {:>22} {:>24} {:>22}",
        "server", "CPU µs per call", "calls/s (c=32)", "p50 µs (c=1)"
    );
    for (i, (name, _, _)) in targets.iter().enumerate() {
        println!(
            "{:<14} {:>22} {:>24} {:>22}",
            name,
            spread(cpu_us[i].clone()),
            spread(rate[i].clone()),
            spread(lat[i].clone())
        );
    }
    drop((bfb, base));

    // Memory per in-flight call, against a sim answering in 3 s.
    let (_slow, slow) = start_sim("3s").await?;
    let (bfb, bfb_addr) = start_bfb(slow, "baseline-mem", roomy).await?;
    let (base, base_addr) = baseline_process(slow).await?;
    // The baseline's one connection to the sim carries at most the sim's
    // 200 concurrent streams (four per call): stay under it.
    let n: u64 = env_or("BENCH_INFLIGHT", 40);
    per_call_kib(&base, base_addr, slow, n).await?;
    per_call_kib(&bfb, bfb_addr, slow, n).await?;
    let b = per_call_kib(&base, base_addr, slow, n).await?;
    let f = per_call_kib(&bfb, bfb_addr, slow, n).await?;
    println!("memory per in-flight GetCustomer ({n} held at a 3 s sim), RSS growth:");
    println!("  hand-written {b:.1} KiB   bfb {f:.1} KiB");
    Ok(())
}
