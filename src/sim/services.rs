//! The simulated downstream services: each answers from the [`Dataset`] after
//! the behaviour its [`SimState`] prescribes.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    component::Component,
    pb::downstream::{
        calls::v1::{ListCallsRequest, ListCallsResponse, calls_service_server::CallsService},
        directory::v1::{
            BatchGetContactsRequest, BatchGetContactsResponse,
            directory_service_server::DirectoryService,
        },
        emails::v1::{ListEmailsRequest, ListEmailsResponse, emails_service_server::EmailsService},
        favorites::v1::{
            ListFavoritesRequest, ListFavoritesResponse, favorites_service_server::FavoritesService,
        },
        orders::v1::{ListOrdersRequest, ListOrdersResponse, orders_service_server::OrdersService},
        profile::v1::{
            GetProfileRequest, GetProfileResponse, profile_service_server::ProfileService,
        },
        reviews::v1::{
            ListReviewsRequest, ListReviewsResponse, reviews_service_server::ReviewsService,
        },
        sms::v1::{ListSmsRequest, ListSmsResponse, sms_service_server::SmsService},
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

impl Sim {
    fn customer(&self, id: &str) -> Result<u64, Status> {
        self.data
            .customer(id)
            .ok_or_else(|| not_found("customer", id))
    }

    fn user(&self, id: &str) -> Result<u64, Status> {
        self.data.user(id).ok_or_else(|| not_found("user", id))
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
        let n = self.customer(&req.get_ref().customer_id)?;
        Ok(Response::new(GetProfileResponse {
            profile: Some(self.data.profile(n)),
        }))
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
        let n = self.customer(&req.get_ref().customer_id)?;
        Ok(Response::new(ListFavoritesResponse {
            favorites: self.data.favorites(n),
        }))
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
        let n = self.customer(&req.get_ref().customer_id)?;
        Ok(Response::new(ListReviewsResponse {
            reviews: self.data.reviews(n),
        }))
    }
}

#[tonic::async_trait]
impl OrdersService for Sim {
    async fn list_orders(
        &self,
        req: Request<ListOrdersRequest>,
    ) -> Result<Response<ListOrdersResponse>, Status> {
        self.state.handle(Component::Orders, req.metadata()).await?;
        let n = self.customer(&req.get_ref().customer_id)?;
        Ok(Response::new(ListOrdersResponse {
            orders: self.data.orders(n),
        }))
    }
}

#[tonic::async_trait]
impl CallsService for Sim {
    async fn list_calls(
        &self,
        req: Request<ListCallsRequest>,
    ) -> Result<Response<ListCallsResponse>, Status> {
        self.state.handle(Component::Calls, req.metadata()).await?;
        let r = req.get_ref();
        let n = self.user(&r.user_id)?;
        Ok(Response::new(ListCallsResponse {
            calls: self
                .data
                .calls(n, r.start_time.as_ref(), r.end_time.as_ref()),
        }))
    }
}

#[tonic::async_trait]
impl EmailsService for Sim {
    async fn list_emails(
        &self,
        req: Request<ListEmailsRequest>,
    ) -> Result<Response<ListEmailsResponse>, Status> {
        self.state.handle(Component::Emails, req.metadata()).await?;
        let r = req.get_ref();
        let n = self.user(&r.user_id)?;
        Ok(Response::new(ListEmailsResponse {
            emails: self
                .data
                .emails(n, r.start_time.as_ref(), r.end_time.as_ref()),
        }))
    }
}

#[tonic::async_trait]
impl SmsService for Sim {
    async fn list_sms(
        &self,
        req: Request<ListSmsRequest>,
    ) -> Result<Response<ListSmsResponse>, Status> {
        self.state.handle(Component::Sms, req.metadata()).await?;
        let r = req.get_ref();
        let n = self.user(&r.user_id)?;
        Ok(Response::new(ListSmsResponse {
            messages: self.data.sms(n, r.start_time.as_ref(), r.end_time.as_ref()),
        }))
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
