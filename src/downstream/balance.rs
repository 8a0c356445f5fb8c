//! Client-side balancing over a downstream's endpoints: power of two
//! choices over peak-EWMA latency × in-flight calls (linkerd2-proxy's
//! algorithm), per-endpoint failure accrual ([`eject`]), connections per
//! endpoint that follow the load, and an immediate `NO_ENDPOINTS` when no
//! endpoint can take a call.
//!
//! [`Balanced`] sends each downstream call ([`super::unary`]) to the
//! endpoint it picks, over [`super::transport`]'s connections. Why not
//! tower's `balance::p2c::Balance` with `load::PeakEwma` (or tonic's
//! `balance_channel` built on them): `Balance`
//! takes `&mut self` to pick, so sharing it needs a `Buffer` task (one more
//! channel hop and task per call); it waits, rather than fails, while no
//! endpoint is ready (calls hang until their deadline); it cannot send a
//! retry to a different endpoint; and its endpoints report nothing an
//! operator could list. The algorithm is the same; the state lives in
//! shared per-endpoint cells, picked from without a task.
//!
//! A pool is shared by every downstream configured with the same endpoints
//! and connection settings. Its endpoint set is replaced by discovery
//! ([`super::discovery`]); unchanged endpoints keep their state and
//! connections.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures::future::{Either, FutureExt};
use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use rand::Rng;
use tokio::{sync::Notify, time::Instant};
use tonic::Status;

use super::{
    discovery::FirstResolution,
    transport::{Answer, Connection, SendError},
};
use crate::{
    config::EjectionSettings,
    resilience::{
        NoEndpoints, Tried,
        eject::{self, Accrual, Change},
    },
    telemetry::metrics::{EndpointLabels, EndpointStateLabels, Metrics, TargetLabels},
};

/// How fast a latency estimate forgets: linkerd2-proxy's 10 s.
const DECAY: Duration = Duration::from_secs(10);
/// The estimate of the first endpoints of a pool, before any answer
/// (linkerd2-proxy's default RTT). Later endpoints start at the pool's mean.
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// The least latency a failed call counts as: a refused connection answers
/// in microseconds, and must not look like the fastest endpoint.
const FAILURE_PENALTY: Duration = Duration::from_millis(100);

/// Connection settings of a pool's endpoints.
#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Outlier ejection.
    pub ejection: EjectionSettings,
    /// Streams in flight on a connection before another is opened.
    pub max_streams_per_connection: usize,
    /// Connections per endpoint at most; `None`: enough for the bulkheads
    /// of the downstreams sharing the pool.
    pub max_connections_per_endpoint: Option<usize>,
}

/// How an endpoint's connections are made (TLS, timeouts, keepalive).
pub type Connector = Arc<super::transport::Connector>;

/// The endpoints of one downstream (or of several sharing them).
pub struct Pool {
    /// The configured endpoint(s): the metrics' `target` label.
    target: String,
    settings: PoolSettings,
    connector: Connector,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// Endpoints counted as ejected (for the max share).
    ejected: AtomicUsize,
    /// The bulkheads of the downstreams using the pool, summed: the most
    /// calls it can have in flight.
    bulkheads: AtomicUsize,
    /// Asks discovery to resolve again early (a connection failed).
    pub(super) resolve_now: Notify,
    /// Set once the endpoint set was first filled.
    pub(super) first: FirstResolution,
    metrics: Arc<Metrics>,
    gauges: StateGauges,
    connections: Gauge,
    ejections: Counter,
}

/// An endpoint's state as the metrics and the admin API name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Its last call succeeded.
    Ready,
    /// No call finished yet, or its last one failed.
    Connecting,
    /// Ejected, or on its probation call.
    Ejected,
}

impl Health {
    /// The label value.
    pub const fn name(self) -> &'static str {
        match self {
            Health::Ready => "ready",
            Health::Connecting => "connecting",
            Health::Ejected => "ejected",
        }
    }
}

struct StateGauges([Gauge; 3]);

impl StateGauges {
    fn get(&self, h: Health) -> &Gauge {
        &self.0[h as usize]
    }
}

/// One address of a downstream.
pub struct Endpoint {
    id: u64,
    addr: SocketAddr,
    state: Mutex<EndpointState>,
    in_flight: AtomicUsize,
    conns: Mutex<Vec<Conn>>,
    calls: Counter,
}

struct EndpointState {
    rtt: PeakEwma,
    accrual: Accrual,
    /// Whether the last finished call succeeded (`None`: none finished).
    last_ok: Option<bool>,
    /// The health counted in the gauges.
    health: Health,
    /// Taken out of the pool: counts and gauges no longer include it.
    removed: bool,
}

struct Conn {
    connection: Arc<Connection>,
    streams: Arc<AtomicUsize>,
}

/// What the admin API shows of an endpoint.
#[derive(Clone, Debug)]
pub struct EndpointView {
    /// `ip:port`.
    pub address: SocketAddr,
    /// Its health.
    pub health: Health,
    /// Peak-EWMA latency estimate.
    pub ewma: Duration,
    /// Calls in flight.
    pub in_flight: usize,
    /// HTTP/2 connections.
    pub connections: usize,
    /// Calls sent so far.
    pub calls: u64,
}

/// Each endpoint gets an id no other endpoint of the process ever had, so a
/// call's [`Tried`] can name it.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Pool {
    /// A pool with no endpoints yet; discovery fills it.
    pub fn new(
        target: String,
        settings: PoolSettings,
        connector: Connector,
        metrics: &Arc<Metrics>,
    ) -> Pool {
        let gauges = StateGauges(
            [Health::Ready, Health::Connecting, Health::Ejected].map(|h| {
                metrics
                    .endpoints
                    .get_or_create(&EndpointStateLabels {
                        target: target.clone(),
                        state: h.name(),
                    })
                    .clone()
            }),
        );
        let t = TargetLabels {
            target: target.clone(),
        };
        Pool {
            connections: metrics.endpoint_connections.get_or_create(&t).clone(),
            ejections: metrics.endpoint_ejections.get_or_create(&t).clone(),
            target,
            settings,
            connector,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            ejected: AtomicUsize::new(0),
            bulkheads: AtomicUsize::new(0),
            resolve_now: Notify::new(),
            first: FirstResolution::default(),
            metrics: metrics.clone(),
            gauges,
        }
    }

    /// The configured endpoint(s).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// A downstream stack with a bulkhead of `max_concurrency` uses the pool.
    pub fn add_bulkhead(&self, max_concurrency: usize) {
        self.bulkheads.fetch_add(max_concurrency, Ordering::Relaxed);
    }

    /// Connections per endpoint at most: as configured, or enough for every
    /// call the bulkheads let through to go to one endpoint.
    fn max_connections(&self) -> usize {
        let s = &self.settings;
        s.max_connections_per_endpoint.unwrap_or_else(|| {
            self.bulkheads
                .load(Ordering::Relaxed)
                .div_ceil(s.max_streams_per_connection)
                .clamp(1, 1000)
        })
    }

    /// Makes `addrs` the endpoint set: endpoints that stay keep their
    /// connections and estimates; new ones start at the pool's mean
    /// estimate; removed ones take no new calls (calls in flight finish).
    pub fn update(&self, addrs: &[SocketAddr]) {
        let current = self.endpoints.load_full();
        if current.len() == addrs.len() && current.iter().all(|e| addrs.contains(&e.addr)) {
            return;
        }
        let now = Instant::now();
        let start = mean_estimate(&current, now);
        let mut next = Vec::with_capacity(addrs.len());
        for &addr in addrs {
            if next.iter().any(|e: &Arc<Endpoint>| e.addr == addr) {
                continue;
            }
            let kept = current.iter().find(|e| e.addr == addr).cloned();
            next.push(kept.unwrap_or_else(|| Arc::new(self.endpoint(addr, start, now))));
        }
        for gone in current.iter().filter(|e| !addrs.contains(&e.addr)) {
            self.remove(gone);
        }
        tracing::info!(
            target = %self.target,
            endpoints = ?next.iter().map(|e| e.addr).collect::<Vec<_>>(),
            "endpoint set changed"
        );
        self.endpoints.store(Arc::new(next));
    }

    fn endpoint(&self, addr: SocketAddr, rtt: Duration, now: Instant) -> Endpoint {
        self.gauges.get(Health::Connecting).inc();
        Endpoint {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            addr,
            state: Mutex::new(EndpointState {
                rtt: PeakEwma::new(rtt, now),
                accrual: Accrual::default(),
                last_ok: None,
                health: Health::Connecting,
                removed: false,
            }),
            in_flight: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            calls: self
                .metrics
                .endpoint_calls
                .get_or_create(&self.endpoint_labels(addr))
                .clone(),
        }
    }

    fn endpoint_labels(&self, addr: SocketAddr) -> EndpointLabels {
        EndpointLabels {
            target: self.target.clone(),
            endpoint: addr.to_string(),
        }
    }

    fn remove(&self, e: &Endpoint) {
        let Ok(mut st) = e.state.lock() else { return };
        st.removed = true;
        self.gauges.get(st.health).dec();
        if st.accrual.is_ejected() {
            self.ejected.fetch_sub(1, Ordering::Relaxed);
        }
        drop(st);
        if let Ok(mut conns) = e.conns.lock() {
            self.connections.dec_by(conns.len() as i64);
            conns.clear();
        }
        self.metrics
            .endpoint_calls
            .remove(&self.endpoint_labels(e.addr));
    }

    /// Every endpoint as the admin API shows it.
    pub fn view(&self) -> Vec<EndpointView> {
        let now = Instant::now();
        self.endpoints
            .load()
            .iter()
            .map(|e| {
                let (health, ewma) = e
                    .state
                    .lock()
                    .map(|mut s| (s.health, s.rtt.decayed(now)))
                    .unwrap_or((Health::Connecting, Duration::ZERO));
                EndpointView {
                    address: e.addr,
                    health,
                    ewma,
                    in_flight: e.in_flight.load(Ordering::Relaxed),
                    connections: e.conns.lock().map(|c| c.len()).unwrap_or(0),
                    calls: e.calls.get(),
                }
            })
            .collect()
    }

    /// Closes extra connections no call uses (the first of each endpoint
    /// stays), so connections follow the load down as well as up.
    pub fn shrink_idle(&self) {
        for e in self.endpoints.load().iter() {
            if let Ok(mut conns) = e.conns.lock() {
                let before = conns.len();
                let mut first = true;
                conns.retain(|c| {
                    let keep = first || c.streams.load(Ordering::Relaxed) > 0;
                    first = false;
                    keep
                });
                self.connections.dec_by((before - conns.len()) as i64);
            }
        }
    }

    /// Picks the endpoint for a call at `now`, avoiding endpoint `avoid`
    /// (the one the call's previous attempt went to) while another can take
    /// it. Power of two choices: of two distinct random endpoints that can
    /// take a call, the one with the lower latency estimate × (in-flight +
    /// 1). `None`: no endpoint can.
    fn pick(&self, avoid: u64, now: Instant) -> Option<Arc<Endpoint>> {
        let eps = self.endpoints.load();
        let n = eps.len();
        if n == 0 {
            return None;
        }
        let mut rng = rand::rng();
        let i = rng.random_range(0..n);
        let chosen = if n == 1 {
            Some(i)
        } else {
            let mut j = rng.random_range(0..n - 1);
            if j >= i {
                j += 1;
            }
            match (eps[i].cost(now, avoid), eps[j].cost(now, avoid)) {
                (Some(a), Some(b)) => Some(if a <= b { i } else { j }),
                (Some(_), None) => Some(i),
                (None, Some(_)) => Some(j),
                (None, None) => None,
            }
        };
        if let Some(c) = chosen
            && eps[c].id != avoid
            && eps[c].admit(now)
        {
            return Some(eps[c].clone());
        }
        // Neither choice could take it: any endpoint that can, from a random
        // start; the avoided one last.
        (0..n)
            .map(|k| &eps[(i + k) % n])
            .find(|e| e.id != avoid && e.admit(now))
            .or_else(|| eps.iter().find(|e| e.id == avoid && e.admit(now)))
            .cloned()
    }

    /// Reserves an ejection slot: always for an endpoint that refuses
    /// connections, else only within the max share.
    fn reserve_ejection(&self, unreachable: bool) -> bool {
        let total = self.endpoints.load().len();
        let share = self.settings.ejection.max_ejected_share;
        self.ejected
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |e| {
                (unreachable || eject::may_eject(e, total, share)).then_some(e + 1)
            })
            .is_ok()
    }

    /// Records how a call to `e` that started at `started` ended.
    fn finish(&self, e: &Endpoint, started: Instant, outcome: Outcome) {
        let now = Instant::now();
        let Ok(mut st) = e.state.lock() else { return };
        let elapsed = now.saturating_duration_since(started);
        let change = match outcome {
            Outcome::Success => {
                st.rtt.observe(elapsed, now);
                st.last_ok = Some(true);
                st.accrual.success()
            }
            Outcome::Failure { unreachable } => {
                st.rtt.observe(elapsed.max(FAILURE_PENALTY), now);
                st.last_ok = Some(false);
                let jitter = rand::rng().random::<f64>();
                let s = &self.settings.ejection;
                st.accrual
                    .failure(s, now, jitter, || self.reserve_ejection(unreachable))
            }
            Outcome::Abandoned => {
                // Cancelled (a timeout, a lost hedge): the time spent is a
                // lower bound of the latency, which only a peak can use.
                st.rtt.observe(elapsed, now);
                st.accrual.abandon();
                Change::None
            }
        };
        if st.removed {
            return;
        }
        match change {
            Change::Ejected => {
                self.ejections.inc();
                tracing::warn!(
                    target = %self.target, endpoint = %e.addr,
                    "endpoint ejected after consecutive failures"
                );
            }
            Change::Restored => {
                self.ejected.fetch_sub(1, Ordering::Relaxed);
                tracing::info!(target = %self.target, endpoint = %e.addr, "endpoint restored");
            }
            Change::None => {}
        }
        let health = match (st.accrual.is_ejected(), st.last_ok) {
            (true, _) => Health::Ejected,
            (false, Some(true)) => Health::Ready,
            (false, _) => Health::Connecting,
        };
        if health != st.health {
            self.gauges.get(st.health).dec();
            self.gauges.get(health).inc();
            st.health = health;
        }
    }
}

/// The mean estimate of `eps` (the default with none): where a new
/// endpoint starts, so it neither floods nor starves.
fn mean_estimate(eps: &[Arc<Endpoint>], now: Instant) -> Duration {
    let estimates: Vec<Duration> = eps
        .iter()
        .filter_map(|e| e.state.lock().ok().map(|mut s| s.rtt.decayed(now)))
        .collect();
    match u32::try_from(estimates.len()) {
        Ok(n) if n > 0 => estimates.iter().sum::<Duration>() / n,
        _ => DEFAULT_RTT,
    }
}

impl Endpoint {
    /// The load p2c compares, if this endpoint can take a call now.
    fn cost(&self, now: Instant, avoid: u64) -> Option<f64> {
        if self.id == avoid {
            return None;
        }
        let mut st = self.state.lock().ok()?;
        if !st.accrual.available(now) {
            return None;
        }
        let pending = self.in_flight.load(Ordering::Relaxed) as f64;
        Some(st.rtt.decayed(now).as_secs_f64() * (pending + 1.0))
    }

    fn admit(&self, now: Instant) -> bool {
        self.state
            .lock()
            .map(|mut s| !s.removed && s.accrual.admit(now))
            .unwrap_or(false)
    }

    /// The connection for the next call, its stream counted: the one with
    /// the fewest streams in flight, or a new one when all of them are at
    /// the cap and the endpoint may have more. Counted under the lock, so a
    /// burst of calls does not all see the same connection as empty.
    fn connection(&self, pool: &Pool) -> Option<(Arc<Connection>, Arc<AtomicUsize>)> {
        let mut conns = self.conns.lock().ok()?;
        let least = conns
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.streams.load(Ordering::Relaxed))
            .map(|(i, c)| (i, c.streams.load(Ordering::Relaxed)));
        let index = match least {
            Some((i, n))
                if n < pool.settings.max_streams_per_connection
                    || conns.len() >= pool.max_connections() =>
            {
                i
            }
            _ => {
                // Lazy: the connection is made by the first call over it.
                conns.push(Conn {
                    connection: Arc::new(Connection::new(self.addr, pool.connector.clone())),
                    streams: Arc::default(),
                });
                pool.connections.inc();
                conns.len() - 1
            }
        };
        let c = &conns[index];
        c.streams.fetch_add(1, Ordering::Relaxed);
        Some((c.connection.clone(), c.streams.clone()))
    }
}

/// How a call through an endpoint ended.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    Success,
    Failure {
        /// The connection could not be made (refused, unreachable).
        unreachable: bool,
    },
    Abandoned,
}

/// Latency estimate that jumps up to a slower sample at once and decays
/// towards faster ones (and towards zero while idle) with time constant
/// [`DECAY`]: a slow endpoint is avoided at once and retried once it has
/// been left alone a while.
#[derive(Clone, Copy, Debug)]
struct PeakEwma {
    estimate: f64,
    at: Instant,
}

impl PeakEwma {
    fn new(start: Duration, now: Instant) -> PeakEwma {
        PeakEwma {
            estimate: start.as_secs_f64(),
            at: now,
        }
    }

    fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_secs_f64();
        if rtt > self.estimate {
            self.estimate = rtt;
        } else {
            let w = self.weight(now);
            self.estimate = self.estimate * w + rtt * (1.0 - w);
        }
        self.at = now;
    }

    /// The estimate decayed to `now` (as if a zero-latency sample came).
    fn decayed(&mut self, now: Instant) -> Duration {
        let w = self.weight(now);
        self.estimate *= w;
        self.at = now;
        Duration::from_secs_f64(self.estimate)
    }

    fn weight(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (-elapsed / DECAY.as_secs_f64()).exp()
    }
}

/// Holds a call's place on its endpoint and connection; records its outcome
/// (or that it was abandoned) when it ends.
struct InFlight {
    pool: Arc<Pool>,
    endpoint: Arc<Endpoint>,
    streams: Arc<AtomicUsize>,
    started: Instant,
    outcome: Option<Outcome>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.streams.fetch_sub(1, Ordering::Relaxed);
        let outcome = self.outcome.unwrap_or(Outcome::Abandoned);
        self.pool.finish(&self.endpoint, self.started, outcome);
    }
}

/// A downstream's calls spread over its pool's endpoints.
#[derive(Clone)]
pub struct Balanced {
    pool: Arc<Pool>,
}

impl Balanced {
    /// Calls go to `pool`'s endpoints.
    pub fn new(pool: Arc<Pool>) -> Balanced {
        Balanced { pool }
    }
}

impl Balanced {
    /// Sends a request (see [`Connection::send`]) to the endpoint the pool
    /// picks, avoiding the one `tried` names (a retry or hedge's previous
    /// attempt) while another can take it, and records the outcome.
    ///
    /// Not an `async fn`, for the reason [`Connection::send`] gives: the
    /// endpoint is picked and the request written before it returns.
    pub fn send(
        &self,
        tried: Option<&Tried>,
        head: http::request::Parts,
        body: Bytes,
    ) -> impl Future<Output = Result<Answer, SendError>> + Send + use<> {
        if !self.pool.first.is_done() {
            // Names not resolved yet (just started): wait for the first
            // answer, within the attempt's timeout, rather than fail.
            let (this, tried) = (self.clone(), tried.cloned());
            return Either::Left(
                async move {
                    this.pool.first.wait().await;
                    this.send(tried.as_ref(), head, body).await
                }
                .boxed(),
            );
        }
        let now = Instant::now();
        let avoid = tried.map_or(0, Tried::last);
        let picked = self.pool.pick(avoid, now).and_then(|e| {
            let (connection, streams) = e.connection(&self.pool)?;
            Some((e, connection, streams))
        });
        let Some((endpoint, connection, streams)) = picked else {
            let none = SendError::Status(Status::from_error(Box::new(NoEndpoints)));
            return Either::Right(Either::Left(std::future::ready(Err(none))));
        };
        if let Some(t) = tried {
            t.set(endpoint.id);
        }
        endpoint.calls.inc();
        endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
        let mut guard = InFlight {
            pool: self.pool.clone(),
            endpoint,
            streams,
            started: now,
            outcome: None,
        };
        let sent = connection.send(head, body);
        Either::Right(Either::Right(async move {
            let result = sent.await;
            let outcome = match &result {
                Ok(answer) => match answer.head.headers.get("grpc-status") {
                    // UNAVAILABLE in a trailers-only answer: the server says
                    // it cannot serve.
                    Some(code) if code == "14" => Outcome::Failure { unreachable: false },
                    _ => Outcome::Success,
                },
                Err(SendError::Transport(e)) => Outcome::Failure {
                    unreachable: refused(e),
                },
                Err(SendError::Status(_)) => Outcome::Failure { unreachable: false },
            };
            guard.outcome = Some(outcome);
            if let Outcome::Failure { unreachable: true } = outcome {
                guard.pool.resolve_now.notify_one();
            }
            result
        }))
    }
}

/// Whether a transport error means nothing accepts connections at the
/// address (refused, unreachable), as opposed to a connection that broke.
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionRefused | HostUnreachable | NetworkUnreachable | AddrNotAvailable
            );
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: u8, share: f64) -> (Pool, Vec<Arc<Endpoint>>) {
        let settings = PoolSettings {
            ejection: EjectionSettings {
                consecutive_failures: 2,
                max_ejected_share: share,
                ..EjectionSettings::default()
            },
            max_streams_per_connection: 2,
            max_connections_per_endpoint: Some(2),
        };
        let connector: Connector = Arc::new(crate::downstream::transport::Connector::plain(
            Duration::from_secs(1),
        ));
        let p = Pool::new("t".into(), settings, connector, &Arc::new(Metrics::new()));
        let addrs: Vec<SocketAddr> = (1..=n).map(|i| ([10, 0, 0, i], 80).into()).collect();
        p.update(&addrs);
        p.first.set();
        let eps = p.endpoints.load_full().to_vec();
        (p, eps)
    }

    fn fail(p: &Pool, e: &Endpoint, times: u32, unreachable: bool) {
        for _ in 0..times {
            p.finish(e, Instant::now(), Outcome::Failure { unreachable });
        }
    }

    fn healths(p: &Pool) -> Vec<Health> {
        p.view().into_iter().map(|v| v.health).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_avoids_the_endpoint_it_repeats_unless_it_is_the_only_one() {
        let (p, eps) = pool(2, 0.5);
        for _ in 0..200 {
            let picked = p.pick(eps[0].id, Instant::now()).expect("pick");
            assert_eq!(picked.id, eps[1].id);
        }
        let (one, eps) = pool(1, 0.5);
        assert_eq!(
            one.pick(eps[0].id, Instant::now()).expect("pick").id,
            eps[0].id
        );
        let (empty, _) = pool(0, 0.5);
        assert!(empty.pick(0, Instant::now()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn two_choices_take_the_cheaper_endpoint() {
        let (p, eps) = pool(2, 0.5);
        let now = Instant::now();
        eps[0]
            .state
            .lock()
            .unwrap()
            .rtt
            .observe(Duration::from_millis(50), now);
        eps[1].state.lock().unwrap().rtt = PeakEwma::new(Duration::from_millis(1), now);
        for _ in 0..100 {
            assert_eq!(p.pick(0, now).expect("pick").id, eps[1].id);
        }
        // Load counts too: 60 calls in flight on the fast one outweigh it.
        eps[1].in_flight.store(60, Ordering::Relaxed);
        assert_eq!(p.pick(0, now).expect("pick").id, eps[0].id);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_answers_eject_within_the_share_refusals_beyond_it() {
        let (p, eps) = pool(3, 0.5);
        fail(&p, &eps[0], 2, false);
        fail(&p, &eps[1], 5, false);
        // At most one of three ejected for failing answers.
        assert_eq!(
            healths(&p),
            [Health::Ejected, Health::Connecting, Health::Connecting]
        );
        // An endpoint that refuses connections goes whatever the share.
        fail(&p, &eps[2], 2, true);
        fail(&p, &eps[1], 1, true);
        assert_eq!(healths(&p), [Health::Ejected; 3]);
        // Nothing can take a call: the pool says so at once.
        assert!(p.pick(0, Instant::now()).is_none());
        // After the backoff (at most 1 s), one probation call per endpoint;
        // its success restores the endpoint and frees its share.
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = p.pick(0, Instant::now()).expect("a probe");
        p.finish(&probe, Instant::now(), Outcome::Success);
        assert_eq!(p.ejected.load(Ordering::Relaxed), 2);
        let ready = healths(&p).iter().filter(|h| **h == Health::Ready).count();
        assert_eq!(ready, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_follow_the_streams_in_flight() {
        let (p, eps) = pool(1, 0.5);
        let e = &eps[0];
        let (_, a) = e.connection(&p).expect("first");
        let (_, b) = e.connection(&p).expect("second stream");
        assert!(Arc::ptr_eq(&a, &b), "two streams fit one connection");
        let (_, c) = e.connection(&p).expect("third stream");
        assert!(!Arc::ptr_eq(&a, &c), "a new connection past the cap");
        // At the connection cap, the least loaded one is shared.
        let (_, d) = e.connection(&p).expect("fourth");
        let (_, f) = e.connection(&p).expect("fifth");
        assert_eq!(e.conns.lock().unwrap().len(), 2);
        assert_eq!(a.load(Ordering::Relaxed) + c.load(Ordering::Relaxed), 5);
        drop((d, f));
        // Idle extra connections close; the first stays.
        c.store(0, Ordering::Relaxed);
        a.store(0, Ordering::Relaxed);
        p.shrink_idle();
        assert_eq!(e.conns.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_endpoint_keeps_its_state_across_updates() {
        let (p, eps) = pool(2, 0.5);
        let kept = eps[1].id;
        p.update(&[eps[1].addr, ([10, 0, 0, 9], 80).into()]);
        let now: Vec<u64> = p.endpoints.load().iter().map(|e| e.id).collect();
        assert_eq!(now[0], kept);
        assert_ne!(now[1], eps[0].id);
        assert!(eps[0].state.lock().unwrap().removed);
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_up_and_decays_down() {
        let now = Instant::now();
        let mut e = PeakEwma::new(Duration::from_millis(10), now);
        e.observe(Duration::from_millis(50), now);
        assert_eq!(e.decayed(now), Duration::from_millis(50));
        tokio::time::advance(DECAY).await;
        let later = Instant::now();
        e.observe(Duration::from_millis(10), later);
        // 50 e⁻¹ + 10 (1 − e⁻¹) ≈ 24.7 ms
        let ms = e.decayed(later).as_secs_f64() * 1e3;
        assert!((24.0..25.5).contains(&ms), "{ms}");
        tokio::time::advance(DECAY * 5).await;
        assert!(e.decayed(Instant::now()) < Duration::from_millis(1));
    }
}
