//! The customer aggregate: profile, favorites, reviews and orders, fetched
//! concurrently.

use crate::{
    component::Component,
    downstream::Loaders,
    error::{Error, Reason},
    pb::downstream::{
        favorites::v1::{Favorite, ListFavoritesRequest},
        orders::v1::{ListOrdersRequest, Order},
        profile::v1::{GetProfileRequest, Profile},
        reviews::v1::{ListReviewsRequest, Review},
    },
    resilience::CallError,
};

use super::{Ask, Deadline, Engine, Entity, Outcome, fetch, needed};

/// The downstream data of one customer, as fetched; adapters shape it.
#[derive(Debug)]
pub struct CustomerParts {
    /// From the profile service.
    pub profile: Outcome<Profile>,
    /// From the favorites service, newest first.
    pub favorites: Outcome<Vec<Favorite>>,
    /// From the reviews service, newest first.
    pub reviews: Outcome<Vec<Review>>,
    /// From the orders service, newest first.
    pub orders: Outcome<Vec<Order>>,
}

impl Engine {
    /// Fetches many customers at once, one result per id in order; their
    /// lookups go downstream in batches (one set of loaders for the call),
    /// and one customer's failure stays its own.
    pub async fn customers(
        &self,
        (scope, ids): (&str, &[String]),
        ask: Ask,
        deadline: Deadline,
    ) -> Vec<Result<CustomerParts, Error>> {
        let loaders = self.loaders(deadline);
        futures::future::join_all(
            ids.iter()
                .map(|id| self.customer((scope, id), ask, deadline, Some(&loaders))),
        )
        .await
    }

    /// Fetches the requested components of customer `id` concurrently, for
    /// a caller whose cache scope is `scope`; through `loaders` when the
    /// request batches its lookups.
    pub async fn customer(
        &self,
        (scope, id): (&str, &str),
        ask: Ask,
        deadline: Deadline,
        loaders: Option<&Loaders>,
    ) -> Result<CustomerParts, Error> {
        let Ask {
            requested,
            completeness,
            policy,
        } = ask;
        let needed = needed(requested, self.customer_required, completeness);
        let ds = &self.downstreams;
        let entity = Entity {
            kind: "customer",
            id,
            owner: Some(Component::Profile),
        };
        let customer_id = || id.to_string();

        let profile = fetch(Component::Profile, requested, needed, entity, || async {
            let msg = GetProfileRequest {
                customer_id: customer_id(),
            };
            let (resp, source) = self
                .cached(
                    Component::Profile,
                    (scope, id),
                    None,
                    policy,
                    needed,
                    deadline,
                    (&ds.profile, loaders.map(|l| &l.profile)),
                    msg,
                )
                .await?;
            let profile = resp.profile.ok_or(CallError::Failed(Reason::BadResponse))?;
            Ok((profile, source))
        });
        let favorites = fetch(Component::Favorites, requested, needed, entity, || async {
            let msg = ListFavoritesRequest {
                customer_id: customer_id(),
            };
            let (resp, source) = self
                .cached(
                    Component::Favorites,
                    (scope, id),
                    None,
                    policy,
                    needed,
                    deadline,
                    (&ds.favorites, loaders.map(|l| &l.favorites)),
                    msg,
                )
                .await?;
            Ok((resp.favorites, source))
        });
        let reviews = fetch(Component::Reviews, requested, needed, entity, || async {
            let msg = ListReviewsRequest {
                customer_id: customer_id(),
            };
            let (resp, source) = self
                .cached(
                    Component::Reviews,
                    (scope, id),
                    None,
                    policy,
                    needed,
                    deadline,
                    (&ds.reviews, loaders.map(|l| &l.reviews)),
                    msg,
                )
                .await?;
            Ok((resp.reviews, source))
        });
        let orders = fetch(Component::Orders, requested, needed, entity, || async {
            let msg = ListOrdersRequest {
                customer_id: customer_id(),
            };
            let (resp, source) = self
                .cached(
                    Component::Orders,
                    (scope, id),
                    None,
                    policy,
                    needed,
                    deadline,
                    (&ds.orders, loaders.map(|l| &l.orders)),
                    msg,
                )
                .await?;
            Ok((resp.orders, source))
        });

        // One task, four futures: no spawn per call, and a failing required
        // component drops (cancels) the others.
        let (profile, favorites, reviews, orders) =
            tokio::try_join!(profile, favorites, reviews, orders)?;
        self.record(&[
            (Component::Profile, profile.state()),
            (Component::Favorites, favorites.state()),
            (Component::Reviews, reviews.state()),
            (Component::Orders, orders.state()),
        ]);
        Ok(CustomerParts {
            profile,
            favorites,
            reviews,
            orders,
        })
    }
}
