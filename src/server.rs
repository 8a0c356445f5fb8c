//! bfb's gRPC server: the public API versions, health and reflection on one
//! listener. [`serve`] takes a bound listener and a shutdown future so tests
//! run the real server on port 0.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::{
    server::NamedService,
    transport::{Server, server::TcpIncoming},
};
use tonic_health::ServingStatus;

use crate::{
    api::{activity_v1::ActivityV1, customer_v1::CustomerV1},
    config::Config,
    downstream::EndpointError,
    engine::Engine,
    inbound::InboundLayer,
    pb::{
        self,
        bfb::{
            activity::v1::user_activity_service_server::UserActivityServiceServer,
            customer::v1::customer_aggregate_service_server::CustomerAggregateServiceServer,
        },
    },
};

/// The gRPC health service's name.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

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

/// Serves bfb on `listener` until `shutdown` completes.
pub async fn serve(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let engine = Arc::new(Engine::new(config)?);
    let max_request = config.server.max_request_bytes;
    let customer_v1 = CustomerAggregateServiceServer::new(CustomerV1::new(engine.clone()))
        .max_decoding_message_size(max_request);
    let activity_v1 = UserActivityServiceServer::new(ActivityV1::new(engine))
        .max_decoding_message_size(max_request);

    let public = [
        <CustomerAggregateServiceServer<CustomerV1> as NamedService>::NAME,
        <UserActivityServiceServer<ActivityV1> as NamedService>::NAME,
    ];
    let (health, health_service) = tonic_health::server::health_reporter();
    let (reflection_v1, reflection_v1alpha) = reflection(&public)?;
    // The listener is bound already, so the public services can report
    // SERVING before the first connection is accepted.
    health.set_service_status("", ServingStatus::Serving).await;
    for name in public {
        health
            .set_service_status(name, ServingStatus::Serving)
            .await;
    }
    tracing::info!(addr = ?listener.local_addr().ok(), "bfb serving");

    let s = &config.server;
    // A backstop only: handlers answer within the caller's deadline, which is
    // capped at deadlines.max.
    let hard_timeout = config.deadlines.max + Duration::from_secs(1);
    Server::builder()
        // Every HTTP/2 limit set explicitly; tonic leaves some unlimited.
        .max_concurrent_streams(s.max_concurrent_streams)
        .http2_max_header_list_size(s.max_header_list_size)
        .http2_max_pending_accept_reset_streams(Some(s.max_pending_accept_reset_streams))
        .http2_max_local_error_reset_streams(Some(s.max_local_error_reset_streams))
        .http2_keepalive_interval(Some(s.keepalive_interval))
        .http2_keepalive_timeout(Some(s.keepalive_timeout))
        .layer(InboundLayer::new(
            s.max_concurrent_rpcs,
            s.shed_retry_after,
            hard_timeout,
            s.max_request_bytes,
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(customer_v1)
        .add_service(activity_v1)
        .serve_with_incoming_shutdown(incoming(listener), shutdown)
        .await?;
    Ok(())
}
