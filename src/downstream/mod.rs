//! The downstream services bfb calls: one [`Downstream`] per method, each a
//! unary call ([`unary`]) behind its own resilience stack ([`stack`]).
//!
//! [`connect`] builds the calls, their credentials and the balancer pools
//! under them: [`discovery`] finds each downstream's endpoints (addresses,
//! DNS names, SRV names), [`balance`] spreads calls over them, ejecting
//! the ones that fail, and [`transport`] holds the HTTP/2 connections.

pub mod balance;
mod connect;
pub mod discovery;
pub mod loader;
pub mod stack;
pub mod transport;
pub mod unary;

use std::{collections::HashMap, sync::Arc};

pub use self::connect::EndpointError;
use self::loader::{BatchFn, Loader};
use crate::{
    component::Component,
    config::BatchSettings,
    deadline::Deadline,
    pb::downstream::{
        calls::v1::*,
        directory::v1::{BatchGetContactsRequest, BatchGetContactsResponse},
        emails::v1::*,
        favorites::v1::*,
        orders::v1::*,
        profile::v1::*,
        reviews::v1::*,
        sms::v1::*,
    },
    resilience::Call,
    resilience::CallError,
};

/// One downstream: its resilience stack over a typed client. Cloning is
/// cheap (an `Arc`).
pub struct Downstream<M, T> {
    stack: Arc<dyn stack::Calls<M, T>>,
}

// By hand: a derive would require `M: Clone, T: Clone`, which the stack does not need.
impl<M, T> Clone for Downstream<M, T> {
    fn clone(&self) -> Self {
        Downstream {
            stack: self.stack.clone(),
        }
    }
}

impl<M, T> Downstream<M, T> {
    /// Calls the downstream through its stack within the caller's deadline.
    /// (A combinator: an `async fn` would keep the message and deadline
    /// beside the stack's future that holds them.)
    pub fn call(
        &self,
        deadline: Deadline,
        message: M,
    ) -> impl Future<Output = Result<T, CallError>> + Send + '_ {
        let call = Call::new(message, deadline);
        futures::FutureExt::map(self.stack.call(call), |r| r.map_err(|f| f.error))
    }
}

/// Every downstream bfb calls.
pub struct Downstreams {
    /// The profile service.
    pub profile: Downstream<GetProfileRequest, GetProfileResponse>,
    /// The favorites service.
    pub favorites: Downstream<ListFavoritesRequest, ListFavoritesResponse>,
    /// The reviews service.
    pub reviews: Downstream<ListReviewsRequest, ListReviewsResponse>,
    /// The orders service.
    pub orders: Downstream<ListOrdersRequest, ListOrdersResponse>,
    /// The calls service.
    pub calls: Downstream<ListCallsRequest, ListCallsResponse>,
    /// The emails service.
    pub emails: Downstream<ListEmailsRequest, ListEmailsResponse>,
    /// The sms service.
    pub sms: Downstream<ListSmsRequest, ListSmsResponse>,
    /// The directory service.
    pub directory: Downstream<BatchGetContactsRequest, BatchGetContactsResponse>,
    /// The batch RPCs, each behind its own stack with its downstream's
    /// settings; used through [`Loaders`].
    batch: BatchDownstreams,
    /// Each downstream's balancer pool (shared when endpoints are).
    pools: Vec<(Component, Arc<balance::Pool>)>,
}

struct BatchDownstreams {
    profile: Downstream<BatchGetProfilesRequest, BatchGetProfilesResponse>,
    favorites: Downstream<BatchListFavoritesRequest, BatchListFavoritesResponse>,
    reviews: Downstream<BatchListReviewsRequest, BatchListReviewsResponse>,
    orders: Downstream<BatchListOrdersRequest, BatchListOrdersResponse>,
    calls: Downstream<BatchListCallsRequest, BatchListCallsResponse>,
    emails: Downstream<BatchListEmailsRequest, BatchListEmailsResponse>,
    sms: Downstream<BatchListSmsRequest, BatchListSmsResponse>,
}

/// One request's loaders: its single lookups, batched (see [`loader`]).
#[derive(Clone)]
pub struct Loaders {
    /// Profiles.
    pub profile: Loader<GetProfileRequest, GetProfileResponse>,
    /// Favorites.
    pub favorites: Loader<ListFavoritesRequest, ListFavoritesResponse>,
    /// Reviews.
    pub reviews: Loader<ListReviewsRequest, ListReviewsResponse>,
    /// Orders.
    pub orders: Loader<ListOrdersRequest, ListOrdersResponse>,
    /// Calls.
    pub calls: Loader<ListCallsRequest, ListCallsResponse>,
    /// E-mails.
    pub emails: Loader<ListEmailsRequest, ListEmailsResponse>,
    /// SMS.
    pub sms: Loader<ListSmsRequest, ListSmsResponse>,
    /// Display names by user id (`None`: the directory does not know it).
    pub directory: Loader<String, Option<String>>,
}

/// A loader over a batch downstream: `$req { requests }` to `results`.
macro_rules! loader {
    ($ds:expr, $req:ident, $deadline:expr, $window:expr, $max:expr) => {{
        let ds = $ds.clone();
        let batch: BatchFn<_, _> = Arc::new(move |requests, deadline| {
            let ds = ds.clone();
            Box::pin(async move {
                let response = ds.call(deadline, $req { requests }).await?;
                Ok(response
                    .results
                    .into_iter()
                    .map(|r| loader::item(r.response, r.error_code))
                    .collect())
            })
        });
        Loader::new($deadline, $window, $max, batch)
    }};
}

impl Downstreams {
    /// Each downstream's balancer pool, for the admin API.
    pub fn pools(&self) -> &[(Component, Arc<balance::Pool>)] {
        &self.pools
    }

    /// Loaders for one request, under `deadline`: batches of at most
    /// `max_batch` (`max_directory_batch` for names), collected for `window`
    /// after their first lookup.
    pub fn loaders(&self, deadline: Deadline, settings: &BatchSettings) -> Loaders {
        let b = &self.batch;
        let (d, w, m) = (deadline, settings.window, settings.max_batch);
        Loaders {
            profile: loader!(b.profile, BatchGetProfilesRequest, d, w, m),
            favorites: loader!(b.favorites, BatchListFavoritesRequest, d, w, m),
            reviews: loader!(b.reviews, BatchListReviewsRequest, d, w, m),
            orders: loader!(b.orders, BatchListOrdersRequest, d, w, m),
            calls: loader!(b.calls, BatchListCallsRequest, d, w, m),
            emails: loader!(b.emails, BatchListEmailsRequest, d, w, m),
            sms: loader!(b.sms, BatchListSmsRequest, d, w, m),
            directory: {
                let ds = self.directory.clone();
                let batch: BatchFn<String, Option<String>> = Arc::new(move |ids, deadline| {
                    let ds = ds.clone();
                    Box::pin(async move {
                        let request = BatchGetContactsRequest {
                            user_ids: ids.clone(),
                        };
                        let mut names: HashMap<String, String> = ds
                            .call(deadline, request)
                            .await?
                            .contacts
                            .into_iter()
                            .map(|c| (c.user_id, c.display_name))
                            .collect();
                        Ok(ids.iter().map(|id| Ok(names.remove(id))).collect())
                    })
                });
                Loader::new(d, w, settings.max_directory_batch, batch)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, telemetry::metrics::Metrics};

    /// Every downstream call in flight holds its stack's boxed future (the
    /// steps, the unary call and the transport's): memory per call
    /// (docs/performance.md). It was 2.8 KiB plus a boxed 1.3 KiB over
    /// tonic's client and channel, 912 bytes now; the limit (1 KiB, an
    /// allocator size class) fails if a step keeps the call or a future
    /// twice, or a request's or answer's head again.
    #[tokio::test]
    async fn a_downstream_calls_future_stays_small() {
        let config = Config::parse(crate::config::EXAMPLE).expect("example");
        let downstreams =
            Downstreams::connect_lazy(&config, &Arc::new(Metrics::new())).expect("downstreams");
        let deadline = Deadline::from_metadata(
            &Default::default(),
            &config.deadlines,
            tokio::time::Instant::now(),
        );
        let call = Call::new(GetProfileRequest::default(), deadline);
        let future = downstreams.profile.stack.call(call);
        let size = std::mem::size_of_val(&*future);
        assert!(size <= 1024, "downstream call future: {size} bytes");
    }
}
