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
        favorites::v1::{ListFavoritesRequest, ListFavoritesResponse},
        orders::v1::{ListOrdersRequest, ListOrdersResponse},
        profile::v1::{
            GetProfileRequest, GetProfileResponse, profile_service_client::ProfileServiceClient,
        },
        reviews::v1::{ListReviewsRequest, ListReviewsResponse},
    },
};
use tokio::process::Child;
use tonic::{Request, Response, Status, transport::Channel};

mod common;

use common::{
    BFB, Boxed, channel, cpu_time, env_or, per_call_kib, rss_kib, spawn_program, start_bfb_from,
    start_sim,
};

/// The hand-written aggregator: the four generated clients over one
/// channel, or over one of several taken in turn when one connection's
/// streams are not enough (thousands of calls in flight).
struct Baseline {
    channels: Vec<Channel>,
    next: std::sync::atomic::AtomicUsize,
}

/// One downstream call exactly as tonic's generated client makes it with
/// its default codec (8 KiB encode buffer): bfb's generated clients use
/// `bfb::pb::LeanCodec`, and the baseline is the code a team would get
/// from tonic-build, not bfb's tuning.
async fn unary<M, R>(
    ch: &Channel,
    path: &'static str,
    request: Request<M>,
) -> Result<Response<R>, Status>
where
    M: prost::Message + Send + Sync + 'static,
    R: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("service was not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<M, R>::default();
    grpc.unary(request, http::uri::PathAndQuery::from_static(path), codec)
        .await
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
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ch = &self.channels[i % self.channels.len()];
        let (profile, favorites, reviews, orders) = tokio::join!(
            unary::<_, GetProfileResponse>(
                ch,
                "/downstream.profile.v1.ProfileService/GetProfile",
                with_deadline(
                    GetProfileRequest {
                        customer_id: id.clone()
                    },
                    t
                )
            ),
            unary::<_, ListFavoritesResponse>(
                ch,
                "/downstream.favorites.v1.FavoritesService/ListFavorites",
                with_deadline(
                    ListFavoritesRequest {
                        customer_id: id.clone()
                    },
                    t
                )
            ),
            unary::<_, ListReviewsResponse>(
                ch,
                "/downstream.reviews.v1.ReviewsService/ListReviews",
                with_deadline(
                    ListReviewsRequest {
                        customer_id: id.clone()
                    },
                    t
                )
            ),
            unary::<_, ListOrdersResponse>(
                ch,
                "/downstream.orders.v1.OrdersService/ListOrders",
                with_deadline(
                    ListOrdersRequest {
                        customer_id: id.clone()
                    },
                    t
                )
            ),
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

/// The baseline server: `serve-baseline ADDR SIM CHANNELS`; prints
/// `listening on ADDR` like `bfb serve`.
async fn serve_baseline(listen: &str, sim: &str, channels: usize) -> Result<(), Boxed> {
    let mut all = Vec::new();
    for _ in 0..channels.max(1) {
        all.push(
            Channel::from_shared(format!("http://{sim}"))?
                .tcp_nodelay(true)
                .connect_lazy(),
        );
    }
    let service = Baseline {
        channels: all,
        next: Default::default(),
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

/// What a variant's load calls.
#[derive(Clone, Copy)]
enum Ask {
    /// `GetProfile` straight to the sim.
    Direct,
    /// GetCustomer, all four components, customers 1..10,000.
    All,
    /// GetCustomer with read mask `profile`.
    ProfileOnly,
    /// GetCustomer over the 100 customers warmed into the cache.
    Hot,
}

/// One server under measurement.
struct Target {
    name: &'static str,
    /// The process whose CPU is counted.
    process: Child,
    addr: SocketAddr,
    ask: Ask,
}

/// One call of `ask`, the `i`th.
async fn call(ch: &Channel, ask: Ask, i: u64) -> Result<(), Status> {
    match ask {
        Ask::Direct => {
            ProfileServiceClient::new(ch.clone())
                .get_profile(GetProfileRequest {
                    customer_id: format!("c-{}", i % 10_000 + 1),
                })
                .await?;
        }
        Ask::All => {
            CustomerAggregateServiceClient::new(ch.clone())
                .get_customer(get(i))
                .await?;
        }
        Ask::ProfileOnly => {
            let mut r = get(i);
            r.read_mask = Some(prost_types::FieldMask {
                paths: vec!["profile".into()],
            });
            CustomerAggregateServiceClient::new(ch.clone())
                .get_customer(r)
                .await?;
        }
        Ask::Hot => {
            CustomerAggregateServiceClient::new(ch.clone())
                .get_customer(get(i % 100))
                .await?;
        }
    }
    Ok(())
}

/// Closed loop at `concurrency` for `secs`: (CPU µs per call of the
/// target's process, calls/s). Any failed call fails the bench.
async fn load(t: &Target, concurrency: u64, secs: f64) -> Result<(f64, f64), Boxed> {
    let ch = channel(t.addr).await?;
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let before = cpu_time(&t.process);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (ch, ask) = (ch.clone(), t.ask);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < until {
                call(&ch, ask, w * 100_000 + n).await?;
                n += 1;
            }
            Ok::<u64, Status>(n)
        }));
    }
    let mut calls = 0;
    for task in tasks {
        calls += task.await??;
    }
    let wall = started.elapsed().as_secs_f64();
    let used = (cpu_time(&t.process) - before).as_secs_f64();
    Ok((used * 1e6 / calls as f64, calls as f64 / wall))
}

/// p50 in µs of `n` sequential calls.
async fn p50(t: &Target, n: u64) -> Result<f64, Boxed> {
    let ch = channel(t.addr).await?;
    let mut took = Vec::new();
    for i in 0..n {
        let started = Instant::now();
        call(&ch, t.ask, i).await?;
        took.push(started.elapsed().as_secs_f64() * 1e6);
    }
    took.sort_by(f64::total_cmp);
    Ok(took[took.len() / 2])
}

/// min / median / max.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn show(v: &[f64], decimals: usize) -> String {
    let (lo, mid, hi) = spread(v);
    format!("{lo:.decimals$} / {mid:.decimals$} / {hi:.decimals$}")
}

/// bfb's limits raised for the memory phase (thousands of slow calls; the
/// baseline has no limits) and slow calls not counted by the breaker.
fn roomy(c: String) -> String {
    c.replace("max_concurrency = 100", "max_concurrency = 20000")
        .replace("max_concurrent_rpcs = 1000", "max_concurrent_rpcs = 20000")
        .replace("timeout = \"1s\"", "timeout = \"30s\"")
        .replace("slow_call = \"1s\"", "slow_call = \"60s\"")
}

async fn baseline_process(sim: SocketAddr, channels: usize) -> Result<(Child, SocketAddr), Boxed> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_str().ok_or("path")?.to_string();
    let (sim, channels) = (sim.to_string(), channels.to_string());
    spawn_program(&exe, &["serve-baseline", "127.0.0.1:0", &sim, &channels]).await
}

/// The bfb binaries measured: this build, and `BENCH_BFB_BEFORE` if set.
fn before_binary() -> Option<String> {
    std::env::var("BENCH_BFB_BEFORE")
        .ok()
        .filter(|p| !p.is_empty())
}

async fn targets(sim: (Child, SocketAddr)) -> Result<Vec<Target>, Boxed> {
    let (sim_process, sim) = sim;
    let mut t = vec![Target {
        name: "direct",
        process: sim_process,
        addr: sim,
        ask: Ask::Direct,
    }];
    let (p, a) = baseline_process(sim, 1).await?;
    t.push(Target {
        name: "hand-written",
        process: p,
        addr: a,
        ask: Ask::All,
    });
    let (p, a) = start_bfb_from(BFB, None, sim, "cmp-default", |c| c).await?;
    t.push(Target {
        name: "bfb",
        process: p,
        addr: a,
        ask: Ask::All,
    });
    let (p, a) = start_bfb_from(BFB, Some("warn"), sim, "cmp-tuned", |c| c).await?;
    t.push(Target {
        name: "bfb-tuned",
        process: p,
        addr: a,
        ask: Ask::All,
    });
    let (p, a) = start_bfb_from(BFB, Some("warn"), sim, "cmp-profile", |c| c).await?;
    t.push(Target {
        name: "bfb-profile",
        process: p,
        addr: a,
        ask: Ask::ProfileOnly,
    });
    let (p, a) = start_bfb_from(BFB, Some("warn"), sim, "cmp-cached", |c| {
        c.replace("[cache]\nenabled = false", "[cache]\nenabled = true")
    })
    .await?;
    t.push(Target {
        name: "bfb-cached",
        process: p,
        addr: a,
        ask: Ask::Hot,
    });
    if let Some(before) = before_binary() {
        let (p, a) = start_bfb_from(&before, Some("warn"), sim, "cmp-before", |c| c).await?;
        t.push(Target {
            name: "bfb-before",
            process: p,
            addr: a,
            ask: Ask::All,
        });
    }
    Ok(t)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> Result<(), Boxed> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve-baseline") {
        let channels = args.get(4).and_then(|c| c.parse().ok()).unwrap_or(1);
        return serve_baseline(&args[2], &args[3], channels).await;
    }
    let secs: f64 = env_or("BENCH_SECS", 3.0);
    let rounds: usize = env_or("BENCH_ROUNDS", 4);

    let targets = targets(start_sim("0ms").await?).await?;
    // Warm connections, caches and allocators.
    for t in &targets {
        load(t, 32, 0.5).await?;
    }
    let k = targets.len();
    let (mut cpu, mut rate, mut lat) = (vec![vec![]; k], vec![vec![]; k], vec![vec![]; k]);
    for round in 0..rounds {
        for j in 0..k {
            let i = (round + j) % k;
            let (c, r) = load(&targets[i], 32, secs).await?;
            cpu[i].push(c);
            rate[i].push(r);
            lat[i].push(p50(&targets[i], 300).await?);
        }
    }
    println!("zero-latency sim, {rounds} rounds in rotating order, min / median / max");
    println!(
        "{:<13} {:>22} {:>26} {:>22}",
        "variant", "CPU µs per call", "calls/s (c=32)", "p50 µs (c=1)"
    );
    for (i, t) in targets.iter().enumerate() {
        println!(
            "{:<13} {:>22} {:>26} {:>22}",
            t.name,
            show(&cpu[i], 1),
            show(&rate[i], 0),
            show(&lat[i], 0)
        );
    }
    // Ratios of medians, each against a figure of the same run.
    let med = |v: &[f64]| spread(v).1;
    let by = |name: &str| targets.iter().position(|t| t.name == name);
    let (Some(direct), Some(hand)) = (by("direct"), by("hand-written")) else {
        return Err("variants missing".into());
    };
    println!("ratios of medians:");
    for name in ["bfb", "bfb-tuned", "bfb-profile", "bfb-before"] {
        if let Some(i) = by(name) {
            println!(
                "  {name:<12} CPU {:.2}× hand-written   p50 +{:.0} µs over direct (hand-written +{:.0} µs)",
                med(&cpu[i]) / med(&cpu[hand]),
                med(&lat[i]) - med(&lat[direct]),
                med(&lat[hand]) - med(&lat[direct]),
            );
        }
    }
    if let Some(i) = by("bfb-cached") {
        println!(
            "  bfb-cached   calls/s {:.2}× direct   p50 +{:.0} µs over direct",
            med(&rate[i]) / med(&rate[direct]),
            med(&lat[i]) - med(&lat[direct]),
        );
    }
    drop(targets);

    // Memory per in-flight call, against a sim answering in 3 s.
    let (_slow, slow) = start_sim("3s").await?;
    let sizes: Vec<u64> = std::env::var("BENCH_INFLIGHT")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    if sizes.is_empty() {
        return Ok(());
    }
    let most = sizes.iter().copied().max().unwrap_or(1000);
    println!("memory per in-flight GetCustomer (sim at 3 s), RSS growth per call, KiB:");
    // One server at a time, so the sim holds only its connections.
    let mut names = vec!["hand-written", "bfb"];
    let before = before_binary();
    if before.is_some() {
        names.push("bfb-before");
    }
    for name in names {
        let (p, a) = match name {
            // The baseline gets a connection per 150 downstream streams in
            // flight (the sim allows 256 per connection), as its authors
            // would once one connection queued their calls.
            "hand-written" => baseline_process(slow, (4 * most as usize).div_ceil(150)).await?,
            "bfb" => start_bfb_from(BFB, Some("warn"), slow, "mem", roomy).await?,
            _ => {
                let program = before.as_deref().ok_or("no before binary")?;
                start_bfb_from(program, Some("warn"), slow, "mem-before", roomy).await?
            }
        };
        per_call_kib(&p, a, slow, 100).await?;
        let mut line = format!("  {name:<13}");
        for &n in &sizes {
            let (first, peak) = per_call_kib(&p, a, slow, n).await?;
            let (again, _) = per_call_kib(&p, a, slow, n).await?;
            line += &format!(
                "  {n} in flight: first {first:.1} (RSS {} MiB), again {again:.1};",
                peak / 1024
            );
        }
        println!("{line}  RSS now {} MiB", rss_kib(&p) / 1024);
    }
    Ok(())
}
