//! Building the downstream clients from config: balancer pools over the
//! endpoints discovery finds, TLS, service tokens, and each client wrapped
//! in its resilience stack.
//!
//! Connections are made lazily (bfb starts even when a downstream is down).
//! A pool is shared by downstreams configured with the same endpoints and
//! connection settings, since HTTP/2 multiplexes their calls; the
//! resilience stacks stay per downstream.

use std::{collections::HashMap, sync::Arc};

use http::HeaderValue;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio_rustls::{
    TlsConnector,
    rustls::{ClientConfig, RootCertStore},
};

use super::{
    BatchDownstreams, Downstream, Downstreams,
    balance::{Balanced, Connector, Pool, PoolSettings},
    discovery::{self, Resolver, Source},
    stack, transport,
    unary::Unary,
};
use crate::{
    component::Component,
    config::{Config, DownstreamSettings, DownstreamTls},
    telemetry::metrics::Metrics,
};

/// A downstream in the config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The config has no section for it.
    #[error("downstream {0}: no section in config")]
    Missing(Component),
    /// Its names cannot be resolved (no usable resolver configuration).
    #[error("downstream {component}: {message}")]
    Discovery {
        /// The downstream.
        component: Component,
        /// What is wrong.
        message: String,
    },
    /// Its TLS files or token file cannot be used.
    #[error("downstream {component}: {message}")]
    Credentials {
        /// The downstream.
        component: Component,
        /// What is wrong.
        message: String,
    },
}

/// Builds one downstream method's unary call over its pool and wraps it in
/// the stack. A macro because they differ only in types and path.
macro_rules! downstream {
    ($pools:expr, $config:expr, $metrics:expr, $component:expr, $rpc:literal) => {{
        let settings = $config
            .downstream($component)
            .ok_or(EndpointError::Missing($component))?;
        let balanced = $pools.get($component, settings, $config, $metrics)?;
        let unary = Arc::new(Unary::new(
            balanced,
            concat!("/", $rpc),
            $config.server.max_downstream_response_bytes,
            service_token($component, settings)?,
        ));
        let rpc = tower::service_fn(move |request: tonic::Request<_>| unary.call(request));
        let stack = stack::build($component, $rpc, settings, $metrics, rpc);
        Downstream { stack }
    }};
}

impl Downstreams {
    /// Builds every downstream of a validated config. No connection is made
    /// until the first call.
    pub fn connect_lazy(
        config: &Config,
        metrics: &Arc<Metrics>,
    ) -> Result<Downstreams, EndpointError> {
        let mut ch = Pools::default();
        let m = metrics;
        let downstreams = Downstreams {
            profile: downstream!(
                ch,
                config,
                m,
                Component::Profile,
                "downstream.profile.v1.ProfileService/GetProfile"
            ),
            favorites: downstream!(
                ch,
                config,
                m,
                Component::Favorites,
                "downstream.favorites.v1.FavoritesService/ListFavorites"
            ),
            reviews: downstream!(
                ch,
                config,
                m,
                Component::Reviews,
                "downstream.reviews.v1.ReviewsService/ListReviews"
            ),
            orders: downstream!(
                ch,
                config,
                m,
                Component::Orders,
                "downstream.orders.v1.OrdersService/ListOrders"
            ),
            calls: downstream!(
                ch,
                config,
                m,
                Component::Calls,
                "downstream.calls.v1.CallsService/ListCalls"
            ),
            emails: downstream!(
                ch,
                config,
                m,
                Component::Emails,
                "downstream.emails.v1.EmailsService/ListEmails"
            ),
            sms: downstream!(
                ch,
                config,
                m,
                Component::Sms,
                "downstream.sms.v1.SmsService/ListSms"
            ),
            directory: downstream!(
                ch,
                config,
                m,
                Component::Directory,
                "downstream.directory.v1.DirectoryService/BatchGetContacts"
            ),
            batch: BatchDownstreams {
                profile: downstream!(
                    ch,
                    config,
                    m,
                    Component::Profile,
                    "downstream.profile.v1.ProfileService/BatchGetProfiles"
                ),
                favorites: downstream!(
                    ch,
                    config,
                    m,
                    Component::Favorites,
                    "downstream.favorites.v1.FavoritesService/BatchListFavorites"
                ),
                reviews: downstream!(
                    ch,
                    config,
                    m,
                    Component::Reviews,
                    "downstream.reviews.v1.ReviewsService/BatchListReviews"
                ),
                orders: downstream!(
                    ch,
                    config,
                    m,
                    Component::Orders,
                    "downstream.orders.v1.OrdersService/BatchListOrders"
                ),
                calls: downstream!(
                    ch,
                    config,
                    m,
                    Component::Calls,
                    "downstream.calls.v1.CallsService/BatchListCalls"
                ),
                emails: downstream!(
                    ch,
                    config,
                    m,
                    Component::Emails,
                    "downstream.emails.v1.EmailsService/BatchListEmails"
                ),
                sms: downstream!(
                    ch,
                    config,
                    m,
                    Component::Sms,
                    "downstream.sms.v1.SmsService/BatchListSms"
                ),
            },
            pools: Vec::new(),
        };
        Ok(Downstreams {
            pools: ch.by_component,
            ..downstreams
        })
    }
}

/// The `authorization` value of a downstream's static service token, read
/// from its `token_file` once at start.
fn service_token(
    component: Component,
    s: &DownstreamSettings,
) -> Result<Option<HeaderValue>, EndpointError> {
    let Some(path) = &s.token_file else {
        return Ok(None);
    };
    let fail = |message: String| EndpointError::Credentials { component, message };
    let token = std::fs::read_to_string(path)
        .map_err(|e| fail(format!("cannot read token_file {}: {e}", path.display())))?;
    HeaderValue::try_from(format!("Bearer {}", token.trim()))
        .map(Some)
        .map_err(|_| fail("token_file holds characters not allowed in a header".into()))
}

/// The TLS connector of a downstream's `tls` section (files read now) and
/// the name its certificates are checked against: `server_name`, or the
/// endpoint's host.
fn client_tls(
    component: Component,
    endpoint: &str,
    tls: &DownstreamTls,
) -> Result<(TlsConnector, ServerName<'static>), EndpointError> {
    let fail = |message: String| EndpointError::Credentials { component, message };
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| fail(format!("cannot read {}: {e}", path.display())))
    };
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(&tls.ca)?) {
        let ca = ca.map_err(|e| fail(format!("tls.ca: {e}")))?;
        roots.add(ca).map_err(|e| fail(format!("tls.ca: {e}")))?;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| fail(e.to_string()))?
    .with_root_certificates(roots);
    let mut config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_slice_iter(&read(cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(format!("tls.cert: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|e| fail(format!("tls.key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| fail(format!("tls.cert/tls.key: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let host = endpoint
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_string))
        .unwrap_or_default();
    let name = tls.server_name.clone().unwrap_or(host);
    let name = ServerName::try_from(name.trim_matches(['[', ']']).to_string())
        .map_err(|e| fail(format!("tls.server_name {name:?}: {e}")))?;
    Ok((TlsConnector::from(Arc::new(config)), name))
}

/// The balancer pools, one per distinct endpoint list and connection
/// settings, and the resolver they share.
#[derive(Default)]
struct Pools {
    pools: HashMap<String, Arc<Pool>>,
    by_component: Vec<(Component, Arc<Pool>)>,
    resolver: Option<Arc<Resolver>>,
}

impl Pools {
    fn get(
        &mut self,
        component: Component,
        s: &DownstreamSettings,
        config: &Config,
        metrics: &Arc<Metrics>,
    ) -> Result<Balanced, EndpointError> {
        let targets: Vec<&str> = s.targets().collect();
        let key = format!(
            "{targets:?} {:?} {:?} {:?} {} {:?}",
            s.connect_timeout,
            s.tls,
            s.ejection,
            s.max_streams_per_connection,
            s.max_connections_per_endpoint
        );
        if let Some(pool) = self.pools.get(&key) {
            pool.add_bulkhead(s.max_concurrency);
            if !self.by_component.iter().any(|(c, _)| *c == component) {
                self.by_component.push((component, pool.clone()));
            }
            return Ok(Balanced::new(pool.clone()));
        }
        let invalid = |e: &str| EndpointError::Discovery {
            component,
            message: format!("invalid endpoint {e:?}"),
        };
        let sources = targets
            .iter()
            .map(|t| Source::parse(t).ok_or_else(|| invalid(t)))
            .collect::<Result<Vec<_>, _>>()?;
        let resolver = if sources.iter().all(|s| matches!(s, Source::Static(_))) {
            None
        } else {
            Some(self.resolver(component, config)?)
        };
        let connector = connector(component, s, &targets, &sources)?;
        let pool = Arc::new(Pool::new(
            targets.join(","),
            PoolSettings {
                ejection: s.ejection.clone(),
                max_streams_per_connection: s.max_streams_per_connection,
                max_connections_per_endpoint: s.max_connections_per_endpoint,
            },
            connector,
            metrics,
        ));
        discovery::start(
            pool.clone(),
            sources,
            resolver,
            config.discovery.clone(),
            metrics.clone(),
        );
        pool.add_bulkhead(s.max_concurrency);
        self.pools.insert(key, pool.clone());
        self.by_component.push((component, pool.clone()));
        Ok(Balanced::new(pool))
    }

    fn resolver(
        &mut self,
        component: Component,
        config: &Config,
    ) -> Result<Arc<Resolver>, EndpointError> {
        if let Some(r) = &self.resolver {
            return Ok(r.clone());
        }
        let r = Arc::new(
            Resolver::new(&config.discovery)
                .map_err(|message| EndpointError::Discovery { component, message })?,
        );
        self.resolver = Some(r.clone());
        Ok(r)
    }
}

/// How connections to one address of `s`'s endpoints are made: its scheme,
/// TLS (the certificate checked against the configured name, not the
/// address), connect timeout and keepalive. Checked once here, so a bad TLS
/// file fails at start.
fn connector(
    component: Component,
    s: &DownstreamSettings,
    targets: &[&str],
    sources: &[Source],
) -> Result<Connector, EndpointError> {
    let first = targets.first().copied().unwrap_or_default();
    // A single host name is the :authority of every call, as if connected
    // by name; addresses speak for themselves.
    let origin = match (targets, sources) {
        ([one], [Source::Host { .. }]) => one
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.authority().cloned()),
        _ => None,
    };
    let mut c = transport::Connector::plain(s.connect_timeout).origin(origin);
    if let Some(tls) = &s.tls {
        let (tls, name) = client_tls(component, first, tls)?;
        c = c.tls(tls, name);
    }
    Ok(Arc::new(c))
}
