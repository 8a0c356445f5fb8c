//! `bfb.admin.v1`: operator control of the cache (`CacheAdmin`) and a view
//! of the balancers' endpoints (`EndpointAdminService`), served on the admin
//! listener only.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    cache::Cache,
    component::{Component, unknown},
    downstream::balance::Health,
    engine::Engine,
    error::Error,
    pb::bfb::admin::v1::{
        DownstreamEndpoints, EndpointStatus, InvalidateEntityRequest, InvalidateEntityResponse,
        ListEndpointsRequest, ListEndpointsResponse, cache_admin_server::CacheAdmin,
        endpoint_admin_service_server::EndpointAdminService, endpoint_status::State,
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
        let components = named(
            "components",
            &req.components,
            &Component::DATA,
            &mut violations,
        );
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

/// The components `names` (request field `field`) name, each one of
/// `allowed`; a violation for each that is not.
fn named(
    field: &str,
    names: &[String],
    allowed: &[Component],
    violations: &mut Vec<tonic_types::FieldViolation>,
) -> Vec<Component> {
    let mut found = Vec::new();
    for (i, name) in names.iter().enumerate() {
        match Component::from_name(name).filter(|c| allowed.contains(c)) {
            Some(c) => found.push(c),
            None => violations.push(unknown(format!("{field}[{i}]"), name, allowed)),
        }
    }
    found
}

/// The v1 endpoint admin service.
pub struct EndpointAdminV1 {
    engine: Arc<Engine>,
}

impl EndpointAdminV1 {
    /// Shows `engine`'s downstream endpoints.
    pub fn new(engine: Arc<Engine>) -> EndpointAdminV1 {
        EndpointAdminV1 { engine }
    }
}

#[tonic::async_trait]
impl EndpointAdminService for EndpointAdminV1 {
    async fn list_endpoints(
        &self,
        request: Request<ListEndpointsRequest>,
    ) -> Result<Response<ListEndpointsResponse>, Status> {
        let req = request.into_inner();
        let mut violations = Vec::new();
        let wanted = named(
            "downstreams",
            &req.downstreams,
            &Component::ALL,
            &mut violations,
        );
        if !violations.is_empty() {
            return Err(Error::InvalidArgument(violations).into());
        }
        let mut pools: Vec<_> = self
            .engine
            .downstreams()
            .pools()
            .iter()
            .filter(|(c, _)| wanted.is_empty() || wanted.contains(c))
            .collect();
        pools.sort_by_key(|(c, _)| *c);
        let downstreams = pools
            .into_iter()
            .map(|(c, pool)| DownstreamEndpoints {
                downstream: c.name().to_string(),
                target: pool.target().to_string(),
                endpoints: pool
                    .view()
                    .into_iter()
                    .map(|e| EndpointStatus {
                        address: e.address.to_string(),
                        state: match e.health {
                            Health::Ready => State::Ready,
                            Health::Connecting => State::Connecting,
                            Health::Ejected => State::Ejected,
                        }
                        .into(),
                        ewma_ms: e.ewma.as_secs_f64() * 1e3,
                        in_flight: e.in_flight as u64,
                        connections: e.connections as u64,
                        calls: e.calls,
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(ListEndpointsResponse { downstreams }))
    }
}
