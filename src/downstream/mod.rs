//! Clients of the downstream services, and the one function every downstream
//! call goes through.
//!
//! Endpoints come only from config. Channels are created lazily (bfb starts
//! even when a downstream is down) and shared between downstreams that have
//! the same endpoint, since HTTP/2 multiplexes their calls over one connection.

use std::{collections::HashMap, future::Future, time::Duration};

use tonic::{
    Code, Request, Response, Status,
    transport::{Channel, Endpoint},
};

use crate::{
    component::Component,
    config::Config,
    engine::deadline::Deadline,
    error::Reason,
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
};

/// How a downstream call failed, as the engine needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The downstream does not know the entity.
    NotFound,
    /// The call failed; the reason says how.
    Failed(Reason),
}

/// One typed client per downstream service, plus each one's call timeout.
#[derive(Clone)]
pub struct Downstreams {
    /// The profile service.
    pub profile: ProfileServiceClient<Channel>,
    /// The favorites service.
    pub favorites: FavoritesServiceClient<Channel>,
    /// The reviews service.
    pub reviews: ReviewsServiceClient<Channel>,
    /// The orders service.
    pub orders: OrdersServiceClient<Channel>,
    /// The calls service.
    pub calls: CallsServiceClient<Channel>,
    /// The emails service.
    pub emails: EmailsServiceClient<Channel>,
    /// The sms service.
    pub sms: SmsServiceClient<Channel>,
    /// The directory service.
    pub directory: DirectoryServiceClient<Channel>,
    /// Per-call timeout of each downstream, indexed by [`Component::index`].
    timeouts: [Duration; 8],
}

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
}

impl Downstreams {
    /// Builds clients for every downstream in a validated config. No
    /// connection is made until the first call.
    pub fn connect_lazy(config: &Config) -> Result<Downstreams, EndpointError> {
        let mut channels: HashMap<(String, Duration), Channel> = HashMap::new();
        let mut timeouts = [Duration::ZERO; 8];
        let mut channel = |c: Component| -> Result<Channel, EndpointError> {
            let s = config.downstream(c).ok_or(EndpointError::Missing(c))?;
            timeouts[c.index()] = s.timeout;
            let key = (s.endpoint.clone(), s.connect_timeout);
            if let Some(ch) = channels.get(&key) {
                return Ok(ch.clone());
            }
            let ch = Endpoint::from_shared(s.endpoint)
                .map_err(|source| EndpointError::Invalid {
                    component: c,
                    source,
                })?
                .connect_timeout(s.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10))
                .keep_alive_while_idle(false)
                .connect_lazy();
            channels.insert(key, ch.clone());
            Ok(ch)
        };
        Ok(Downstreams {
            profile: ProfileServiceClient::new(channel(Component::Profile)?),
            favorites: FavoritesServiceClient::new(channel(Component::Favorites)?),
            reviews: ReviewsServiceClient::new(channel(Component::Reviews)?),
            orders: OrdersServiceClient::new(channel(Component::Orders)?),
            calls: CallsServiceClient::new(channel(Component::Calls)?),
            emails: EmailsServiceClient::new(channel(Component::Emails)?),
            sms: SmsServiceClient::new(channel(Component::Sms)?),
            directory: DirectoryServiceClient::new(channel(Component::Directory)?),
            timeouts,
        })
    }

    /// Makes one call to `component`'s downstream within the caller's
    /// deadline. `send` gets the prepared request (its `grpc-timeout` set to
    /// the call's budget) and performs the RPC. The budget is also enforced
    /// here, so a downstream that never answers cannot hold the call.
    pub async fn call<M, T, F, Fut>(
        &self,
        component: Component,
        deadline: &Deadline,
        message: M,
        send: F,
    ) -> Result<T, CallError>
    where
        F: FnOnce(Request<M>) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let budget = deadline
            .budget(self.timeouts[component.index()])
            .map_err(CallError::Failed)?;
        let mut request = Request::new(message);
        request.set_timeout(budget.timeout);
        match tokio::time::timeout(budget.timeout, send(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(classify(component, &status, budget.caller_bound)),
            Err(_elapsed) => Err(CallError::Failed(timeout_reason(budget.caller_bound))),
        }
    }
}

fn timeout_reason(caller_bound: bool) -> Reason {
    if caller_bound {
        Reason::DeadlineExceeded
    } else {
        Reason::Timeout
    }
}

/// Maps a downstream's status to what it means for bfb. The downstream's
/// message is logged here and goes no further.
fn classify(component: Component, status: &Status, caller_bound: bool) -> CallError {
    tracing::debug!(%component, code = ?status.code(), message = status.message(), "downstream call failed");
    CallError::Failed(match status.code() {
        Code::NotFound => return CallError::NotFound,
        // tonic servers answer CANCELLED ("Timeout expired") when the
        // grpc-timeout bfb sent runs out, often just before bfb's own timer.
        Code::DeadlineExceeded | Code::Cancelled => timeout_reason(caller_bound),
        Code::Unavailable | Code::ResourceExhausted | Code::Aborted => Reason::Unavailable,
        Code::Internal | Code::Unknown | Code::DataLoss => Reason::DownstreamError,
        Code::Ok
        | Code::InvalidArgument
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Unauthenticated => Reason::DownstreamRejected,
    })
}
