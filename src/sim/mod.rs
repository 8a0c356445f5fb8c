//! `bfb sim`: the simulated downstream services (profile, favorites, reviews,
//! orders, calls, emails, sms, directory) with run-time fault injection
//! through `bfb.sim.v1.SimControl`.
//!
//! - [`data`]: the deterministic dataset;
//! - [`state`]: per-service behaviour and stats;
//! - [`services`]: the downstream contracts served from them;
//! - [`control`]: the control service.

pub mod control;
pub mod data;
pub mod services;
pub mod state;

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use crate::{
    component::Component,
    pb::{
        bfb::sim::v1::sim_control_server::SimControlServer,
        downstream::{
            calls::v1::calls_service_server::CallsServiceServer,
            directory::v1::directory_service_server::DirectoryServiceServer,
            emails::v1::emails_service_server::EmailsServiceServer,
            favorites::v1::favorites_service_server::FavoritesServiceServer,
            orders::v1::orders_service_server::OrdersServiceServer,
            profile::v1::profile_service_server::ProfileServiceServer,
            reviews::v1::reviews_service_server::ReviewsServiceServer,
            sms::v1::sms_service_server::SmsServiceServer,
        },
    },
    server::{ServeError, incoming, reflection},
};

use self::{
    control::Control,
    data::Dataset,
    services::Sim,
    state::{Behavior, SimState},
};

/// What a sim process serves.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The services to serve.
    pub services: Vec<Component>,
    /// The dataset's size.
    pub data: Dataset,
    /// Every service's behaviour at start.
    pub behavior: Behavior,
    /// Serve over TLS (tests of bfb's downstream TLS); none: plaintext.
    pub tls: Option<SimTls>,
}

/// TLS of a sim: its certificate, and the CA client certificates must chain
/// to (mTLS) if set. PEM text.
#[derive(Clone, Debug)]
pub struct SimTls {
    /// Certificate chain.
    pub cert: String,
    /// Private key.
    pub key: String,
    /// Client CA; set: clients must present a certificate.
    pub client_ca: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            services: Component::ALL.to_vec(),
            data: Dataset {
                customers: 10_000,
                users: 10_000,
            },
            behavior: Behavior::default(),
            tls: None,
        }
    }
}

/// Serves the sim on `listener` until `shutdown` completes.
pub async fn serve(
    config: SimConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let state = Arc::new(SimState::new(config.behavior));
    let sim = Sim {
        state: state.clone(),
        data: config.data,
    };
    let on = |c: Component| config.services.contains(&c).then(|| sim.clone());
    let accepted = state.clone();
    let connections = futures::StreamExt::inspect(incoming(listener), move |c| {
        if c.is_ok() {
            accepted.connection_accepted();
        }
    });
    let (health, health_service) = tonic_health::server::health_reporter();
    for c in &config.services {
        health
            .set_service_status(service_name(*c), tonic_health::ServingStatus::Serving)
            .await;
    }
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let mut served: Vec<&'static str> = config.services.iter().map(|&c| service_name(c)).collect();
    served.push(<SimControlServer<Control> as tonic::server::NamedService>::NAME);
    let (reflection_v1, reflection_v1alpha) = reflection(&served)?;
    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        let mut t = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key));
        if let Some(ca) = &tls.client_ca {
            t = t.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(t)?;
    }
    builder
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(SimControlServer::new(Control::new(
            state,
            config.services.clone(),
        )))
        .add_optional_service(on(Component::Profile).map(ProfileServiceServer::new))
        .add_optional_service(on(Component::Favorites).map(FavoritesServiceServer::new))
        .add_optional_service(on(Component::Reviews).map(ReviewsServiceServer::new))
        .add_optional_service(on(Component::Orders).map(OrdersServiceServer::new))
        .add_optional_service(on(Component::Calls).map(CallsServiceServer::new))
        .add_optional_service(on(Component::Emails).map(EmailsServiceServer::new))
        .add_optional_service(on(Component::Sms).map(SmsServiceServer::new))
        .add_optional_service(on(Component::Directory).map(DirectoryServiceServer::new))
        .serve_with_incoming_shutdown(connections, shutdown)
        .await?;
    Ok(())
}

/// The gRPC service name of a downstream, as health checks know it.
pub fn service_name(c: Component) -> &'static str {
    use tonic::server::NamedService;
    match c {
        Component::Profile => ProfileServiceServer::<Sim>::NAME,
        Component::Favorites => FavoritesServiceServer::<Sim>::NAME,
        Component::Reviews => ReviewsServiceServer::<Sim>::NAME,
        Component::Orders => OrdersServiceServer::<Sim>::NAME,
        Component::Calls => CallsServiceServer::<Sim>::NAME,
        Component::Emails => EmailsServiceServer::<Sim>::NAME,
        Component::Sms => SmsServiceServer::<Sim>::NAME,
        Component::Directory => DirectoryServiceServer::<Sim>::NAME,
    }
}
