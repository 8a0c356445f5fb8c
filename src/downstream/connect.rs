//! Building the downstream clients from config: channels, TLS, service
//! tokens, and each client wrapped in its resilience stack.
//!
//! Endpoints come only from config. Channels are created lazily (bfb starts
//! even when a downstream is down) and shared between downstreams that have
//! the same endpoint, since HTTP/2 multiplexes their calls over one
//! connection; the resilience stacks stay per downstream.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::{BatchDownstreams, Downstream, Downstreams, stack};
use crate::{
    component::Component,
    config::{Config, DownstreamSettings, DownstreamTls},
    pb::downstream::{
        calls::v1::calls_service_client::CallsServiceClient,
        directory::v1::directory_service_client::DirectoryServiceClient,
        emails::v1::emails_service_client::EmailsServiceClient,
        favorites::v1::favorites_service_client::FavoritesServiceClient,
        orders::v1::orders_service_client::OrdersServiceClient,
        profile::v1::profile_service_client::ProfileServiceClient,
        reviews::v1::reviews_service_client::ReviewsServiceClient,
        sms::v1::sms_service_client::SmsServiceClient,
    },
    telemetry::metrics::Metrics,
};

/// A downstream in the config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The config has no section for it.
    #[error("downstream {0}: no section in config")]
    Missing(Component),
    /// Its endpoint is not a usable URI.
    #[error("downstream {component}: invalid endpoint: {source}")]
    Invalid {
        /// The downstream.
        component: Component,
        /// What tonic said.
        source: tonic::transport::Error,
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

/// Builds each downstream's typed client over a shared channel and wraps it
/// in the stack. A macro because the eight differ only in types and method.
macro_rules! downstream {
    ($channels:expr, $config:expr, $metrics:expr, $component:expr, $client:ident, $method:ident, $rpc:literal) => {{
        let settings = $config
            .downstream($component)
            .ok_or(EndpointError::Missing($component))?;
        let channel = $channels.get($component, settings)?;
        // Behind an Arc: every layer clones the stack below it per call, and
        // a tonic client is not cheap to clone; it is cloned once per attempt.
        let client = Arc::new(
            $client::new(channel)
                .max_decoding_message_size($config.server.max_downstream_response_bytes),
        );
        let token = service_token($component, settings)?;
        let rpc = tower::service_fn(move |mut request: tonic::Request<_>| {
            if let Some(t) = &token {
                request.metadata_mut().insert("authorization", t.clone());
            }
            let mut client = $client::clone(&client);
            async move { client.$method(request).await }
        });
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
        let mut ch = Channels::default();
        let m = metrics;
        Ok(Downstreams {
            profile: downstream!(
                ch,
                config,
                m,
                Component::Profile,
                ProfileServiceClient,
                get_profile,
                "downstream.profile.v1.ProfileService/GetProfile"
            ),
            favorites: downstream!(
                ch,
                config,
                m,
                Component::Favorites,
                FavoritesServiceClient,
                list_favorites,
                "downstream.favorites.v1.FavoritesService/ListFavorites"
            ),
            reviews: downstream!(
                ch,
                config,
                m,
                Component::Reviews,
                ReviewsServiceClient,
                list_reviews,
                "downstream.reviews.v1.ReviewsService/ListReviews"
            ),
            orders: downstream!(
                ch,
                config,
                m,
                Component::Orders,
                OrdersServiceClient,
                list_orders,
                "downstream.orders.v1.OrdersService/ListOrders"
            ),
            calls: downstream!(
                ch,
                config,
                m,
                Component::Calls,
                CallsServiceClient,
                list_calls,
                "downstream.calls.v1.CallsService/ListCalls"
            ),
            emails: downstream!(
                ch,
                config,
                m,
                Component::Emails,
                EmailsServiceClient,
                list_emails,
                "downstream.emails.v1.EmailsService/ListEmails"
            ),
            sms: downstream!(
                ch,
                config,
                m,
                Component::Sms,
                SmsServiceClient,
                list_sms,
                "downstream.sms.v1.SmsService/ListSms"
            ),
            directory: downstream!(
                ch,
                config,
                m,
                Component::Directory,
                DirectoryServiceClient,
                batch_get_contacts,
                "downstream.directory.v1.DirectoryService/BatchGetContacts"
            ),
            batch: BatchDownstreams {
                profile: downstream!(
                    ch,
                    config,
                    m,
                    Component::Profile,
                    ProfileServiceClient,
                    batch_get_profiles,
                    "downstream.profile.v1.ProfileService/BatchGetProfiles"
                ),
                favorites: downstream!(
                    ch,
                    config,
                    m,
                    Component::Favorites,
                    FavoritesServiceClient,
                    batch_list_favorites,
                    "downstream.favorites.v1.FavoritesService/BatchListFavorites"
                ),
                reviews: downstream!(
                    ch,
                    config,
                    m,
                    Component::Reviews,
                    ReviewsServiceClient,
                    batch_list_reviews,
                    "downstream.reviews.v1.ReviewsService/BatchListReviews"
                ),
                orders: downstream!(
                    ch,
                    config,
                    m,
                    Component::Orders,
                    OrdersServiceClient,
                    batch_list_orders,
                    "downstream.orders.v1.OrdersService/BatchListOrders"
                ),
                calls: downstream!(
                    ch,
                    config,
                    m,
                    Component::Calls,
                    CallsServiceClient,
                    batch_list_calls,
                    "downstream.calls.v1.CallsService/BatchListCalls"
                ),
                emails: downstream!(
                    ch,
                    config,
                    m,
                    Component::Emails,
                    EmailsServiceClient,
                    batch_list_emails,
                    "downstream.emails.v1.EmailsService/BatchListEmails"
                ),
                sms: downstream!(
                    ch,
                    config,
                    m,
                    Component::Sms,
                    SmsServiceClient,
                    batch_list_sms,
                    "downstream.sms.v1.SmsService/BatchListSms"
                ),
            },
        })
    }
}

/// The `authorization` value of a downstream's static service token, read
/// from its `token_file` once at start.
fn service_token(
    component: Component,
    s: &DownstreamSettings,
) -> Result<Option<MetadataValue<Ascii>>, EndpointError> {
    let Some(path) = &s.token_file else {
        return Ok(None);
    };
    let fail = |message: String| EndpointError::Credentials { component, message };
    let token = std::fs::read_to_string(path)
        .map_err(|e| fail(format!("cannot read token_file {}: {e}", path.display())))?;
    MetadataValue::try_from(format!("Bearer {}", token.trim()))
        .map(Some)
        .map_err(|_| fail("token_file holds characters not allowed in a header".into()))
}

/// The tonic TLS config of a downstream's `tls` section (files read now).
fn client_tls(
    component: Component,
    endpoint: &str,
    tls: &DownstreamTls,
) -> Result<ClientTlsConfig, EndpointError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| EndpointError::Credentials {
            component,
            message: format!("cannot read {}: {e}", path.display()),
        })
    };
    let host = endpoint
        .parse::<http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_string))
        .unwrap_or_default();
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(&tls.ca)?))
        .domain_name(tls.server_name.clone().unwrap_or(host));
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(config)
}

/// Lazily connected channels, one per distinct endpoint, connect timeout
/// and TLS settings.
#[derive(Default)]
struct Channels(HashMap<(String, Duration, Option<DownstreamTls>), Channel>);

impl Channels {
    fn get(
        &mut self,
        component: Component,
        s: &DownstreamSettings,
    ) -> Result<Channel, EndpointError> {
        let key = (s.endpoint.clone(), s.connect_timeout, s.tls.clone());
        if let Some(ch) = self.0.get(&key) {
            return Ok(ch.clone());
        }
        let mut endpoint = Endpoint::from_shared(s.endpoint.clone())
            .map_err(|source| EndpointError::Invalid { component, source })?;
        if let Some(tls) = &s.tls {
            endpoint = endpoint
                .tls_config(client_tls(component, &s.endpoint, tls)?)
                .map_err(|source| EndpointError::Invalid { component, source })?;
        }
        let ch = endpoint
            .connect_timeout(s.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(false)
            .connect_lazy();
        self.0.insert(key, ch.clone());
        Ok(ch)
    }
}
