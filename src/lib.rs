//! bfb — a Backend-for-Backend: one gRPC call returns a complete, versioned
//! aggregate of a domain whose data lives in several downstream services.
//!
//! # Layout
//!
//! A request flows top to bottom through these modules:
//!
//! - [`server`]: the tonic server: public API versions, health, reflection on
//!   one listener (plaintext or TLS), the admin and health-only listeners,
//!   HTTP/2 limits; `serve(config, listeners, shutdown)`.
//! - [`api`]: one thin adapter per contract version (`customer_v1`,
//!   `customer_v2`, `activity_v1`, and `admin_v1` for operators): validate the
//!   request, call the engine, shape the answer.
//! - [`engine`]: the fan-out engine shared by every version: which downstream
//!   calls to make, concurrently, under the caller's [`deadline::Deadline`], and
//!   how required and optional components fail (`customer`, `activity`).
//! - [`cache`]: the component cache between the engine and the downstreams:
//!   freshness windows, stale-while-revalidate, stale-if-error, caller
//!   control, the shared Redis tier (`cache::shared`) and request
//!   coalescing (`cache::singleflight`).
//! - [`downstream`]: one typed client per downstream service, each behind its
//!   own resilience stack, composed top to bottom in `downstream::stack`.
//! - [`resilience`]: the stack's layers, one module each: bulkhead, retry
//!   (with budget and pushback), hedge, circuit breaker, attempt (deadline
//!   budget as `grpc-timeout`, status classification).
//! - [`inbound`]: protection in front of every bfb service on every listener:
//!   load shedding, a hard timeout answered as DEADLINE_EXCEEDED, oversized
//!   requests, the cap on open health watches.
//! - [`auth`]: who is calling and what it may do: mTLS with SPIFFE IDs
//!   (`auth::tls`, bfb's own TLS termination with reloaded files, and its
//!   accept loop with capped pending handshakes, `auth::accept`), JWT bearer
//!   tokens (`auth::jwt`), default-deny consumers with their methods,
//!   components, cache scope and rate/concurrency limits (`auth::consumers`).
//! - [`telemetry`]: logs, OTLP traces with W3C propagation, Prometheus
//!   metrics and their endpoint, and the span/log/metrics around every RPC.
//! - [`error`]: the request error type and its single mapping to
//!   `tonic::Status` with `google.rpc` details.
//! - [`component`]: the components of the aggregates and read-mask parsing.
//! - [`config`]: the typed TOML configuration, validated at load, every
//!   problem reported at once with its path (`config::load`).
//! - [`sim`]: `bfb sim`, the simulated downstream services with run-time
//!   fault injection (`SimControl`).
//! - [`demo`]: `bfb demo`, the sim and bfb in one process.
//! - [`pb`]: code generated from `proto/` and the reflection descriptors.

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
