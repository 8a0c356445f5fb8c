//! `bfb.admin.v1.CacheAdmin`: operator control of the cache, served on the
//! admin listener only.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    cache::Cache,
    component::{Component, unknown},
    error::Error,
    pb::bfb::admin::v1::{
        InvalidateEntityRequest, InvalidateEntityResponse, cache_admin_server::CacheAdmin,
    },
};

use super::check_id;

/// The v1 cache admin service.
pub struct CacheAdminV1 {
    cache: Arc<Cache>,
}

impl CacheAdminV1 {
    /// Administers `cache`.
    pub fn new(cache: Arc<Cache>) -> CacheAdminV1 {
        CacheAdminV1 { cache }
    }
}

#[tonic::async_trait]
impl CacheAdmin for CacheAdminV1 {
    async fn invalidate_entity(
        &self,
        request: Request<InvalidateEntityRequest>,
    ) -> Result<Response<InvalidateEntityResponse>, Status> {
        let req = request.into_inner();
        let mut violations = Vec::new();
        check_id("entity_id", &req.entity_id, &mut violations);
        let cached = &Component::DATA;
        let mut components = Vec::new();
        for (i, name) in req.components.iter().enumerate() {
            match Component::from_name(name).filter(|c| cached.contains(c)) {
                Some(c) => components.push(c),
                None => violations.push(unknown(format!("components[{i}]"), name, cached)),
            }
        }
        if !violations.is_empty() {
            return Err(Error::InvalidArgument(violations).into());
        }
        let (local, shared, broadcast) = self.cache.invalidate(&req.entity_id, &components).await;
        tracing::info!(local, shared, broadcast, "cache entries invalidated");
        Ok(Response::new(InvalidateEntityResponse {
            local_entries: local,
            shared_entries: shared,
            broadcast,
        }))
    }
}
