//! The simulated downstream services: each answers from the [`Dataset`] after
//! the behaviour its [`SimState`] prescribes.

use std::sync::Arc;

use tonic::{Request, Response, Status};

// Every message of every downstream contract is used here.
use crate::{
    component::Component,
    pb::downstream::{
        calls::v1::{calls_service_server::CallsService, *},
        directory::v1::{directory_service_server::DirectoryService, *},
        emails::v1::{emails_service_server::EmailsService, *},
        favorites::v1::{favorites_service_server::FavoritesService, *},
        orders::v1::{orders_service_server::OrdersService, *},
        profile::v1::{profile_service_server::ProfileService, *},
        reviews::v1::{reviews_service_server::ReviewsService, *},
        sms::v1::{sms_service_server::SmsService, *},
    },
};

use super::{data::Dataset, state::SimState};

/// Largest directory batch the simulated directory accepts.
pub const MAX_DIRECTORY_BATCH: usize = 1000;

/// One value implements every simulated service; cloning shares the state.
#[derive(Clone)]
pub struct Sim {
    /// Behaviour and stats.
    pub state: Arc<SimState>,
    /// The data.
    pub data: Dataset,
}

fn not_found(kind: &str, id: &str) -> Status {
    Status::not_found(format!("{kind} {id:?} not found"))
}

/// Answers a batch: one behaviour step for the whole call (one call in the
/// stats), then every item on its own, NOT_FOUND per item.
async fn batch<M, T, R>(
    sim: &Sim,
    component: Component,
    metadata: &tonic::metadata::MetadataMap,
    requests: &[M],
    answer: impl Fn(&M) -> Result<T, Status>,
    result: impl Fn(Option<T>, u32) -> R,
) -> Result<Vec<R>, Status> {
    sim.state.handle(component, metadata).await?;
    if requests.len() > MAX_BATCH {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_BATCH} requests per batch"
        )));
    }
    Ok(requests
        .iter()
        .map(|r| match answer(r) {
            Ok(v) => result(Some(v), 0),
            Err(s) => result(None, s.code() as u32),
        })
        .collect())
}

/// Largest batch of the batch RPCs.
pub const MAX_BATCH: usize = 1000;

impl Sim {
    fn customer(&self, id: &str) -> Result<u64, Status> {
        self.data
            .customer(id)
            .ok_or_else(|| not_found("customer", id))
    }

    fn user(&self, id: &str) -> Result<u64, Status> {
        self.data.user(id).ok_or_else(|| not_found("user", id))
    }

    fn get_profile_answer(&self, r: &GetProfileRequest) -> Result<GetProfileResponse, Status> {
        let n = self.customer(&r.customer_id)?;
        Ok(GetProfileResponse {
            profile: Some(self.data.profile(n)),
        })
    }

    fn list_favorites_answer(
        &self,
        r: &ListFavoritesRequest,
    ) -> Result<ListFavoritesResponse, Status> {
        let n = self.customer(&r.customer_id)?;
        Ok(ListFavoritesResponse {
            favorites: self.data.favorites(n),
        })
    }

    fn list_reviews_answer(&self, r: &ListReviewsRequest) -> Result<ListReviewsResponse, Status> {
        let n = self.customer(&r.customer_id)?;
        Ok(ListReviewsResponse {
            reviews: self.data.reviews(n),
        })
    }

    fn list_orders_answer(&self, r: &ListOrdersRequest) -> Result<ListOrdersResponse, Status> {
        let n = self.customer(&r.customer_id)?;
        Ok(ListOrdersResponse {
            orders: self.data.orders(n),
        })
    }

    fn list_calls_answer(&self, r: &ListCallsRequest) -> Result<ListCallsResponse, Status> {
        let n = self.user(&r.user_id)?;
        Ok(ListCallsResponse {
            calls: self
                .data
                .calls(n, r.start_time.as_ref(), r.end_time.as_ref()),
        })
    }

    fn list_emails_answer(&self, r: &ListEmailsRequest) -> Result<ListEmailsResponse, Status> {
        let n = self.user(&r.user_id)?;
        Ok(ListEmailsResponse {
            emails: self
                .data
                .emails(n, r.start_time.as_ref(), r.end_time.as_ref()),
        })
    }

    fn list_sms_answer(&self, r: &ListSmsRequest) -> Result<ListSmsResponse, Status> {
        let n = self.user(&r.user_id)?;
        Ok(ListSmsResponse {
            messages: self.data.sms(n, r.start_time.as_ref(), r.end_time.as_ref()),
        })
    }
}

#[tonic::async_trait]
impl ProfileService for Sim {
    async fn get_profile(
        &self,
        req: Request<GetProfileRequest>,
    ) -> Result<Response<GetProfileResponse>, Status> {
        self.state
            .handle(Component::Profile, req.metadata())
            .await?;
        self.get_profile_answer(req.get_ref()).map(Response::new)
    }

    async fn batch_get_profiles(
        &self,
        req: Request<BatchGetProfilesRequest>,
    ) -> Result<Response<BatchGetProfilesResponse>, Status> {
        let results = batch(
            self,
            Component::Profile,
            req.metadata(),
            &req.get_ref().requests,
            |r| self.get_profile_answer(r),
            |response, error_code| GetProfileResult {
                response,
                error_code,
            },
        )
        .await?;
        Ok(Response::new(BatchGetProfilesResponse { results }))
    }
}

#[tonic::async_trait]
impl FavoritesService for Sim {
    async fn list_favorites(
        &self,
        req: Request<ListFavoritesRequest>,
    ) -> Result<Response<ListFavoritesResponse>, Status> {
        self.state
            .handle(Component::Favorites, req.metadata())
            .await?;
        self.list_favorites_answer(req.get_ref()).map(Response::new)
    }

    async fn batch_list_favorites(
        &self,
        req: Request<BatchListFavoritesRequest>,
    ) -> Result<Response<BatchListFavoritesResponse>, Status> {
        let results = batch(
            self,
            Component::Favorites,
            req.metadata(),
            &req.get_ref().requests,
            |r| self.list_favorites_answer(r),
            |response, error_code| ListFavoritesResult {
                response,
                error_code,
            },
        )
        .await?;
        Ok(Response::new(BatchListFavoritesResponse { results }))
    }
}

#[tonic::async_trait]
impl ReviewsService for Sim {
    async fn list_reviews(
        &self,
        req: Request<ListReviewsRequest>,
    ) -> Result<Response<ListReviewsResponse>, Status> {
        self.state
            .handle(Component::Reviews, req.metadata())
            .await?;
        self.list_reviews_answer(req.get_ref()).map(Response::new)
    }

    async fn batch_list_reviews(
        &self,
        req: Request<BatchListReviewsRequest>,
    ) -> Result<Response<BatchListReviewsResponse>, Status> {
        let results = batch(
            self,
            Component::Reviews,
            req.metadata(),
            &req.get_ref().requests,
            |r| self.list_reviews_answer(r),
            |response, error_code| ListReviewsResult {
                response,
                error_code,
            },
        )
        .await?;
        Ok(Response::new(BatchListReviewsResponse { results }))
    }
}

#[tonic::async_trait]
impl OrdersService for Sim {
    async fn list_orders(
        &self,
        req: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        self.state.handle(Component::Orders, req.metadata()).await?;
        self.list_orders_answer(req.get_ref()).map(Response::new)
    }

    async fn batch_list_orders(
        &self,
        req: Request<BatchListOrdersRequest>,
    ) -> Result<Response<BatchListOrdersResponse>, Status> {
        let results = batch(
            self,
            Component::Orders,
            req.metadata(),
            &req.get_ref().requests,
            |r| self.list_orders_answer(r),
            |response, error_code| ListOrdersResult {
                response,
                error_code,
            },
        )
        .await?;
        Ok(Response::new(BatchListOrdersResponse { results }))
    }
}

#[tonic::async_trait]
impl CallsService for Sim {
    async fn list_calls(
        &self,
        req: Request<ListCallsRequest>,
    ) -> Result<Response<ListCallsResponse>, Status> {
        self.state.handle(Component::Calls, req.metadata()).await?;
        self.list_calls_answer(req.get_ref()).map(Response::new)
    }

    async fn batch_list_calls(
        &self,
        req: Request<BatchListCallsRequest>,
    ) -> Result<Response<BatchListCallsResponse>, Status> {
        let results = batch(
            self,
            Component::Calls,
            req.metadata(),
            &req.get_ref().requests,
            |r| self.list_calls_answer(r),
            |response, error_code| ListCallsResult {
                response,
                error_code,
            },
        )
        .await?;
        Ok(Response::new(BatchListCallsResponse { results }))
    }
}

#[tonic::async_trait]
impl EmailsService for Sim {
    async fn list_emails(
        &self,
        req: Request<ListEmailsRequest>,
    ) -> Result<Response<ListEmailsResponse>, Status> {
        self.state.handle(Component::Emails, req.metadata()).await?;
        self.list_emails_answer(req.get_ref()).map(Response::new)
    }

    async fn batch_list_emails(
        &self,
        req: Request<BatchListEmailsRequest>,
    ) -> Result<Response<BatchListEmailsResponse>, Status> {
        let results = batch(
            self,
            Component::Emails,
            req.metadata(),
            &req.get_ref().requests,
            |r| self.list_emails_answer(r),
            |response, error_code| ListEmailsResult {
                response,
                error_code,
            },
        )
        .await?;
        Ok(Response::new(BatchListEmailsResponse { results }))
    }
}

#[tonic::async_trait]
impl SmsService for Sim {
    async fn list_sms(
        &self,
        req: Request<ListSmsRequest>,
    ) -> Result<Response<ListSmsResponse>, Status> {
        self.state.handle(Component::Sms, req.metadata()).await?;
        self.list_sms_answer(req.get_ref()).map(Response::new)
    }

    async fn batch_list_sms(
        &self,
        req: Request<BatchListSmsRequest>,
    ) -> Result<Response<BatchListSmsResponse>, Status> {
        let results = batch(
            self,
            Component::Sms,
            req.metadata(),
            &req.get_ref().requests,
            |r| self.list_sms_answer(r),
            |response, error_code| ListSmsResult {
                response,
                error_code,
            },
        )
        .await?;
        Ok(Response::new(BatchListSmsResponse { results }))
    }
}

#[tonic::async_trait]
impl DirectoryService for Sim {
    async fn batch_get_contacts(
        &self,
        req: Request<BatchGetContactsRequest>,
    ) -> Result<Response<BatchGetContactsResponse>, Status> {
        self.state
            .handle(Component::Directory, req.metadata())
            .await?;
        let ids = &req.get_ref().user_ids;
        if ids.len() > MAX_DIRECTORY_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_DIRECTORY_BATCH} ids per batch"
            )));
        }
        Ok(Response::new(BatchGetContactsResponse {
            contacts: ids.iter().filter_map(|id| self.data.contact(id)).collect(),
        }))
    }
}
