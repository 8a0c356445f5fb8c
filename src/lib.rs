//! bfb — a Backend-for-Backend: one gRPC call returns a complete, versioned
//! aggregate of a domain whose data lives in several downstream services.
//!
//! # Layout
//!
//! The modules form layers that import only downward (`tests/architecture.rs`
//! fails on any other edge and on any cycle). Top to bottom:
//!
//! - [`demo`]: `bfb demo`, the sim and bfb in one process.
//! - [`sim`]: `bfb sim`, the simulated downstream services with run-time
//!   fault injection (`SimControl`).
//! - [`server`]: the tonic server: public API versions, health, reflection on
//!   one listener (plaintext or TLS), the admin and health-only listeners,
//!   every HTTP/2 limit on each; `serve(config, listeners, shutdown)`.
//! - [`api`]: one thin adapter per contract version (`customer_v1`,
//!   `customer_v2`, `activity_v1`, and `admin_v1` for operators: cache
//!   invalidation and the balancers' endpoint lists): check the
//!   request, call the engine, shape the answer; the preambles they share
//!   live in `api` itself.
//! - [`engine`]: the fan-out engine shared by every version: which downstream
//!   calls to make, concurrently, under the caller's deadline; how required
//!   and optional components fail; who owns an entity (`customer`,
//!   `activity`, with the scheduler of activity streams); and what each
//!   aggregate came to, recorded for telemetry from its typed outcomes.
//! - [`cache`]: the component cache between the engine and the downstreams:
//!   freshness windows, stale-while-revalidate, stale-if-error, caller
//!   control, the key format (`cache::key`), the shared Redis tier
//!   (`cache::shared`) over one server, Sentinel or Cluster
//!   (`cache::topology`), and request coalescing (`cache::singleflight`).
//! - [`downstream`]: one unary call per downstream method
//!   (`downstream::unary`: the message framed and sent, the answer and its
//!   status read back), built from config in `downstream::connect`, each
//!   behind its own resilience stack, composed top to bottom in
//!   `downstream::stack`, over a balancer (`downstream::balance`: power of
//!   two choices over peak-EWMA latency, connections per endpoint that
//!   follow the load, `NO_ENDPOINTS`) whose endpoints `downstream::discovery`
//!   finds (addresses, DNS A/AAAA, SRV) and whose HTTP/2 connections
//!   `downstream::transport` keeps (made on first use, again after a break,
//!   keepalive pings); per-request batching loaders (`downstream::loader`).
//! - [`resilience`]: the stack's layers, one module each: bulkhead, retry
//!   (with budget and pushback), hedge, circuit breaker, attempt (deadline
//!   budget as `grpc-timeout`, status classification); per-endpoint failure
//!   accrual the balancer applies (`resilience::eject`); and the failures
//!   they produce (`Failed`, `CallError`).
//! - [`auth`]: who is calling and what it may do: mTLS with SPIFFE IDs
//!   (`auth::tls`, bfb's own TLS termination with reloaded files, and its
//!   accept loop with capped pending handshakes, `auth::accept`), JWT bearer
//!   tokens (`auth::jwt`), default-deny consumers with their methods,
//!   components, cache scope and rate/concurrency limits (`auth::consumers`).
//! - [`inbound`]: protection in front of every bfb service on every listener:
//!   load shedding, a hard timeout answered as DEADLINE_EXCEEDED, oversized
//!   requests, the cap on open health watches.
//! - [`telemetry`]: logs, OTLP traces with W3C propagation, Prometheus
//!   metrics and their endpoint, and the span/log/metrics around every RPC.
//! - [`deadline`]: the caller's deadline and each downstream call's budget.
//! - [`config`]: the typed TOML configuration, each section checked beside
//!   its type, every problem reported at once with its path (`config::load`).
//! - [`error`]: the request error type and its single mapping to
//!   `tonic::Status` with `google.rpc` details, bounded in size.
//! - [`component`]: the components of the aggregates and read-mask parsing.
//! - [`pb`]: code generated from `proto/` (with `pb::LeanCodec`, tonic's
//!   prost codec with a small encode buffer), the reflection descriptors and
//!   the methods they define.

#![warn(missing_docs)]

pub mod api;
pub mod auth;
pub mod cache;
pub mod component;
pub mod config;
pub mod deadline;
pub mod demo;
pub mod downstream;
pub mod engine;
pub mod error;
pub mod inbound;
pub mod pb;
pub mod resilience;
pub mod server;
pub mod sim;
pub mod telemetry;
