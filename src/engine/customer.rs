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

use super::{Ask, Deadline, Engine, Entity, Job, Outcome, needed};

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
        let ds = &self.downstreams;
        let job = Job {
            entity: Entity {
                kind: "customer",
                id,
                owner: Some(Component::Profile),
            },
            scope,
            window: None,
            requested: ask.requested,
            needed: needed(ask.requested, self.customer_required, ask.completeness),
            policy: ask.policy,
            deadline,
            loaders,
        };
        let customer_id = || id.to_string();
        let profile = self.part(
            &job,
            Component::Profile,
            (&ds.profile, |l| &l.profile),
            || GetProfileRequest {
                customer_id: customer_id(),
            },
            |r| r.profile.ok_or(CallError::Failed(Reason::BadResponse)),
        );
        let favorites = self.part(
            &job,
            Component::Favorites,
            (&ds.favorites, |l| &l.favorites),
            || ListFavoritesRequest {
                customer_id: customer_id(),
            },
            |r| Ok(r.favorites),
        );
        let reviews = self.part(
            &job,
            Component::Reviews,
            (&ds.reviews, |l| &l.reviews),
            || ListReviewsRequest {
                customer_id: customer_id(),
            },
            |r| Ok(r.reviews),
        );
        let orders = self.part(
            &job,
            Component::Orders,
            (&ds.orders, |l| &l.orders),
            || ListOrdersRequest {
                customer_id: customer_id(),
            },
            |r| Ok(r.orders),
        );

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
