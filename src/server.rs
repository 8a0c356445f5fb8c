//! bfb's gRPC server: the public API versions, health and reflection on one
//! listener, the metrics endpoint on another, and the lifecycle: readiness,
//! draining and graceful shutdown. [`serve`] takes bound listeners and a
//! shutdown future so tests run the real server on port 0.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::{
    server::NamedService,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::ServingStatus;

use crate::{
    api::{
        activity_v1::ActivityV1,
        admin_v1::{CacheAdminV1, EndpointAdminV1},
        customer_v1::CustomerV1,
        customer_v2::CustomerV2,
    },
    auth::{
        AuthLayer,
        tls::{ServerTls, TlsConnection},
    },
    config::{Config, ServerSettings},
    downstream::EndpointError,
    engine::Engine,
    inbound::InboundLayer,
    pb::{
        self,
        bfb::{
            activity::v1::user_activity_service_server::UserActivityServiceServer,
            admin::v1::{
                cache_admin_server::CacheAdminServer,
                endpoint_admin_service_server::EndpointAdminServiceServer,
            },
            customer::v1::customer_aggregate_service_server::CustomerAggregateServiceServer,
            customer::v2::customer_aggregate_service_server::CustomerAggregateServiceServer as CustomerV2Server,
        },
    },
    telemetry::metrics::{self, Metrics},
};

/// The gRPC health service's name.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// The health-check service name of readiness: NOT_SERVING until bfb has
/// started and again from the moment it starts draining. (Liveness is the
/// empty service name, SERVING while the process can serve.)
pub const READINESS: &str = "readiness";

/// Why a server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A downstream endpoint is unusable.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// The reflection descriptors could not be loaded.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// TLS files or the JWKS could not be loaded.
    #[error("{0}")]
    Security(String),
}

/// The listeners bfb serves on.
pub struct Listeners {
    /// gRPC: the API, health and reflection.
    pub grpc: TcpListener,
    /// Prometheus `GET /metrics`; none: no endpoint.
    pub metrics: Option<TcpListener>,
    /// The admin API (`bfb.admin.v1`); none: not served.
    pub admin: Option<TcpListener>,
    /// Plaintext health only, for Kubernetes probes when `grpc` uses TLS;
    /// none: health is served on `grpc` only.
    pub health: Option<TcpListener>,
}

/// A server running on one listener (plaintext or TLS), until its signal.
type Serving = Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>>;

/// The connections of one listener.
enum Incoming<T> {
    Plain(TcpIncoming),
    Tls(T),
}

/// A tonic server with every `[server]` HTTP/2 limit set explicitly (tonic
/// leaves some unlimited). Every listener starts from this, so none is
/// less protected than the public one.
fn builder(s: &ServerSettings) -> Server {
    Server::builder()
        .max_concurrent_streams(s.max_concurrent_streams)
        .http2_max_header_list_size(s.max_header_list_size)
        .http2_max_pending_accept_reset_streams(Some(s.max_pending_accept_reset_streams))
        .http2_max_local_error_reset_streams(Some(s.max_local_error_reset_streams))
        .http2_keepalive_interval(Some(s.keepalive_interval))
        .http2_keepalive_timeout(Some(s.keepalive_timeout))
        .max_connection_age(s.max_connection_age)
        .max_connection_age_grace(s.max_connection_age_grace)
}

/// Serves `router` on `incoming` until `signal`.
fn serve_on<L, T>(
    router: tonic::transport::server::Router<L>,
    incoming: Incoming<T>,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Serving
where
    T: futures::Stream<Item = Result<TlsConnection, std::io::Error>> + Send + 'static,
    L: tower::Layer<tonic::service::Routes> + Send + 'static,
    L::Service: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Clone
        + Send
        + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Future: Send + 'static,
    <L::Service as tower::Service<http::Request<tonic::body::Body>>>::Error:
        Into<tower::BoxError> + Send,
{
    match incoming {
        Incoming::Tls(conns) => Box::pin(router.serve_with_incoming_shutdown(conns, signal)),
        Incoming::Plain(conns) => Box::pin(router.serve_with_incoming_shutdown(conns, signal)),
    }
}

/// An optional address for logs: the address, or `-`.
fn addr_text(addr: Option<std::net::SocketAddr>) -> String {
    addr.map_or_else(|| "-".into(), |a| a.to_string())
}

/// Reflection services (`grpc.reflection.v1` and `v1alpha`) that list the
/// `served` services (plus health and reflection) and describe them with
/// their proto comments.
pub fn reflection(
    served: &[&'static str],
) -> Result<
    (
        tonic_reflection::server::v1::ServerReflectionServer<
            impl tonic_reflection::server::v1::ServerReflection,
        >,
        tonic_reflection::server::v1alpha::ServerReflectionServer<
            impl tonic_reflection::server::v1alpha::ServerReflection,
        >,
    ),
    tonic_reflection::server::Error,
> {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc error details, so grpcurl can decode them too.
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH_SERVICE)
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for name in served {
            b = b.with_service_name(*name);
        }
        b
    };
    Ok((builder().build_v1()?, builder().build_v1alpha()?))
}

/// Accepted connections with `TCP_NODELAY`. `Server::tcp_nodelay` only
/// applies to listeners tonic binds itself; without this, two responses
/// written back to back on one HTTP/2 connection wait ~40 ms for a delayed
/// ACK (Nagle), which `make bench` showed as a 44 ms fan-out.
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Serves bfb until `shutdown` completes, then drains: readiness goes
/// NOT_SERVING at once, serving continues for `server.drain_delay`, then no
/// new connections or calls are accepted and in-flight calls get
/// `server.shutdown_grace` to finish.
pub async fn serve(
    config: &Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let metrics = Arc::new(Metrics::new());
    metrics.init_known(&metrics::Known {
        methods: &crate::api::METHODS,
        cached: &crate::component::Component::DATA,
        auth_rejections: &crate::auth::REJECTIONS,
        consumers: config.auth.consumers.keys().cloned().collect(),
    });
    let auth = AuthLayer::new(config, &metrics).map_err(ServeError::Security)?;
    let tls = config
        .tls
        .as_ref()
        .map(|t| ServerTls::load(t, config.auth.reload_interval))
        .transpose()
        .map_err(ServeError::Security)?;
    let engine = Arc::new(Engine::new(config, &metrics)?);
    let admin = CacheAdminServer::new(CacheAdminV1::new(engine.cache().clone()));
    let endpoint_admin = EndpointAdminServiceServer::new(EndpointAdminV1::new(engine.clone()));
    let max_request = config.server.max_request_bytes;
    let customer_v1 = CustomerAggregateServiceServer::new(CustomerV1::new(engine.clone()))
        .max_decoding_message_size(max_request);
    let customer_v2 = CustomerV2Server::new(CustomerV2::new(engine.clone()))
        .max_decoding_message_size(max_request);
    let activity_v1 = UserActivityServiceServer::new(ActivityV1::new(engine))
        .max_decoding_message_size(max_request);
    let public = [
        <CustomerAggregateServiceServer<CustomerV1> as NamedService>::NAME,
        <CustomerV2Server<CustomerV2> as NamedService>::NAME,
        <UserActivityServiceServer<ActivityV1> as NamedService>::NAME,
    ];
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(READINESS, ServingStatus::NotServing)
        .await;
    let (reflection_v1, reflection_v1alpha) = reflection(&public)?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let s = &config.server;
    // A backstop only: handlers answer within the caller's deadline, which is
    // capped at deadlines.max.
    let hard_timeout = config.deadlines.max + Duration::from_secs(1);
    // Every listener gets the same inbound protection (each its own cap of
    // RPCs in flight; health watches are capped over all of them).
    let watches = Arc::new(tokio::sync::Semaphore::new(s.max_health_watches));
    let inbound = || {
        InboundLayer::new(
            s.max_concurrent_rpcs,
            s.shed_retry_after,
            hard_timeout,
            s.max_request_bytes,
            metrics.load_shed.clone(),
        )
        .with_watches(watches.clone(), metrics.health_watches.clone())
        .with_in_flight(metrics.rpcs_in_flight.clone())
    };
    let connections = |listener: TcpListener, tls: Option<&ServerTls>| match tls {
        Some(tls) => Incoming::Tls(tls.incoming(listener, metrics.handshakes())),
        None => Incoming::Plain(incoming(listener)),
    };
    let metrics_addr = listeners.metrics.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(listener) = listeners.admin {
        let (admin_reflection, admin_reflection_v1alpha) = reflection(&[
            <CacheAdminServer<CacheAdminV1> as NamedService>::NAME,
            <EndpointAdminServiceServer<EndpointAdminV1> as NamedService>::NAME,
        ])?;
        tracing::info!(addr = %addr_text(listener.local_addr().ok()), "admin API serving");
        let router = builder(s)
            .layer(inbound())
            .layer(auth.clone())
            .add_service(
                health_service
                    .clone()
                    .max_decoding_message_size(max_request),
            )
            .add_service(admin.max_decoding_message_size(max_request))
            .add_service(endpoint_admin.max_decoding_message_size(max_request))
            .add_service(admin_reflection.max_decoding_message_size(max_request))
            .add_service(admin_reflection_v1alpha.max_decoding_message_size(max_request));
        tokio::spawn(serve_on(
            router,
            connections(listener, tls.as_ref()),
            stopped(stop_rx.clone()),
        ));
    }
    if let Some(listener) = listeners.health {
        tracing::info!(addr = %addr_text(listener.local_addr().ok()), "plaintext health serving");
        let router = builder(s).layer(inbound()).add_service(
            health_service
                .clone()
                .max_decoding_message_size(max_request),
        );
        tokio::spawn(serve_on(
            router,
            connections(listener, None),
            stopped(stop_rx.clone()),
        ));
    }
    // Readiness as the metrics port's GET /ready shows it (the gRPC health
    // service's `readiness` carries the same state).
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(listener) = listeners.metrics {
        tokio::spawn(metrics::serve(
            metrics.clone(),
            ready.clone(),
            listener,
            stopped(stop_rx.clone()),
        ));
    }

    let grpc_addr = listeners.grpc.local_addr().ok();
    let server = builder(s)
        .layer(inbound())
        .layer(auth)
        .add_service(health_service.max_decoding_message_size(max_request))
        .add_service(reflection_v1.max_decoding_message_size(max_request))
        .add_service(reflection_v1alpha.max_decoding_message_size(max_request))
        .add_service(customer_v1)
        .add_service(customer_v2)
        .add_service(activity_v1);
    let server = serve_on(
        server,
        connections(listeners.grpc, tls.as_ref()),
        stopped(stop_rx),
    );

    // Liveness and the public services: SERVING now that the listener is
    // bound; readiness last, when everything is in place.
    health.set_service_status("", ServingStatus::Serving).await;
    for name in public {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    health
        .set_service_status(READINESS, ServingStatus::Serving)
        .await;
    ready.store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(
        grpc = %addr_text(grpc_addr),
        metrics = %metrics::describe(metrics_addr),
        "bfb serving"
    );

    let lifecycle = async {
        shutdown.await;
        tracing::info!(drain_delay = ?s.drain_delay, "shutdown requested: readiness NOT_SERVING, draining");
        ready.store(false, std::sync::atomic::Ordering::Release);
        health
            .set_service_status(READINESS, ServingStatus::NotServing)
            .await;
        for name in public {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        tokio::time::sleep(s.drain_delay).await;
        tracing::info!(grace = ?s.shutdown_grace, "no longer accepting; waiting for in-flight calls");
        let _ = stop_tx.send(true);
        tokio::time::sleep(s.shutdown_grace).await;
    };
    tokio::select! {
        result = server => result?,
        () = lifecycle => tracing::warn!("shutdown grace period over; in-flight calls dropped"),
    }
    tracing::info!("bfb stopped");
    Ok(())
}
