//! Every downstream's client stack, composed here, outermost layer first.
//! Read top to bottom, this is the path of one downstream call.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tower::{Service, ServiceBuilder, retry::budget::TpsBudget, util::BoxCloneSyncService};

use crate::{
    component::Component,
    config::DownstreamSettings,
    resilience::{
        Call, Failed,
        attempt::AttemptLayer,
        breaker::{Breaker, BreakerLayer},
        bulkhead::BulkheadLayer,
        hedge::HedgeLayer,
        retry::RetryLayer,
    },
    telemetry::metrics::Metrics,
};

/// Wraps the tonic call `rpc` (named `rpc_name`, e.g.
/// `downstream.orders.v1.OrdersService/ListOrders`) of `component`'s
/// downstream in its resilience stack.
pub fn build<M, T, S>(
    component: Component,
    rpc_name: &'static str,
    settings: &DownstreamSettings,
    metrics: &Arc<Metrics>,
    rpc: S,
) -> BoxCloneSyncService<Call<M>, T, Failed>
where
    S: Service<Request<M>, Response = Response<T>, Error = Status> + Clone + Send + Sync + 'static,
    S::Future: Send,
    M: Clone + Send + Sync + 'static,
    T: Send + 'static,
{
    let r = &settings.retry;
    // One budget for retries and hedges: together at most budget_percent of calls.
    let budget = Arc::new(TpsBudget::new(
        r.budget_ttl,
        r.budget_min_per_sec,
        r.budget_percent,
    ));
    let m = metrics.downstream(component);
    let breaker = Arc::new(Breaker::with_metrics(settings.breaker.clone(), m.clone()));
    let stack = ServiceBuilder::new()
        // 1. Bulkhead: cap calls in flight to this downstream (retries and
        //    hedges of a call ride on its slot); over the cap, fail at once
        //    with BULKHEAD_FULL instead of queueing.
        .layer(BulkheadLayer::new(settings.max_concurrency, m.clone()))
        // 2. Retry UNAVAILABLE with jittered backoff inside the deadline,
        //    under the budget, honouring grpc-retry-pushback-ms.
        .layer(RetryLayer::new(
            settings.retry.clone(),
            budget.clone(),
            m.clone(),
        ))
        // 3. Hedge (if enabled): a second copy after the observed percentile.
        .layer(HedgeLayer::new(settings.hedge.clone(), budget, m.clone()))
        // 4. Circuit breaker: every attempt (retries and hedges included) is
        //    an outcome; while open, attempts fail in microseconds.
        .layer(BreakerLayer::new(breaker))
        // 5. Attempt: grpc-timeout = min(timeout, deadline left - reserve),
        //    enforced locally too; the status classified.
        //    Each attempt is a client span carrying the trace context and request id.
        .layer(AttemptLayer::new(settings.timeout, component, rpc_name, m))
        .service(rpc);
    BoxCloneSyncService::new(stack)
}
