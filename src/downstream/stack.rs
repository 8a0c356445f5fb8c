//! Every downstream's client stack, composed here, outermost step first.
//! Read top to bottom, [`Stack::call`] is the path of one downstream call.

use std::sync::Arc;

use futures::{
    FutureExt,
    future::{BoxFuture, Either},
};
use tonic::{Request, Response, Status};
use tower::{Service, ServiceExt, retry::budget::TpsBudget};

use crate::{
    component::Component,
    config::DownstreamSettings,
    resilience::{
        Call, Failed, attempt::AttemptLayer, breaker::Breaker, bulkhead::BulkheadLayer,
        hedge::HedgeLayer, retry::RetryLayer,
    },
    telemetry::metrics::Metrics,
};

/// A downstream's stack over its tonic call `S`: the layers' shared state,
/// run by [`Stack::call`] as plain steps.
///
/// Flattened rather than composed as tower services (the layer types in
/// `crate::resilience` remain, tested as services, and run the same
/// functions): a tower stack clones the services below it and boxes a
/// future at every layer for every call, which cost more CPU and memory per
/// downstream call than the layers' own work (docs/performance.md).
pub struct Stack<S> {
    bulkhead: BulkheadLayer,
    retry: RetryLayer,
    hedge: HedgeLayer,
    breaker: Arc<Breaker>,
    attempt: AttemptLayer,
    rpc: S,
}

impl<S> Stack<S> {
    /// One downstream call, outermost step first.
    ///
    /// Not an `async fn` (nor are the hedge, breaker and attempt steps):
    /// each would keep the call (or its future) once more in the future of
    /// every downstream call in flight.
    pub fn call<M, T>(&self, call: Call<M>) -> impl Future<Output = Result<T, Failed>> + Send + '_
    where
        S: Service<Request<M>, Response = Response<T>, Error = Status> + Clone + Send + Sync,
        S::Future: Send,
        M: Clone + Send + Sync + 'static,
        T: Send + 'static,
    {
        // 1. Bulkhead: cap calls in flight to this downstream (retries and
        //    hedges of a call ride on its slot); over the cap, fail at once
        //    with BULKHEAD_FULL instead of queueing.
        let slot = match self.bulkhead.enter() {
            Ok(slot) => slot,
            Err(full) => return Either::Left(std::future::ready(Err(full))),
        };
        // 2. Retry UNAVAILABLE with jittered backoff inside the deadline,
        //    under the budget, honouring grpc-retry-pushback-ms.
        let called = self.retry.run(call, |call| {
            // 3. Hedge (if enabled): a second copy after the observed
            //    percentile.
            self.hedge.run(call, |call| {
                // 4. Circuit breaker: every attempt (retries and hedges
                //    included) is an outcome; while open, attempts fail
                //    in microseconds.
                self.breaker.guard(
                    // 5. Attempt: grpc-timeout = min(timeout, deadline
                    //    left - reserve), enforced locally too; the status
                    //    classified. Each attempt is a client span carrying
                    //    the trace context and request id.
                    self.attempt
                        .run(call, |request| self.rpc.clone().oneshot(request)),
                )
            })
        });
        Either::Right(called.map(move |result| {
            drop(slot);
            result
        }))
    }
}

/// A stack with its tonic call's type erased: what a [`super::Downstream`]
/// holds.
pub trait Calls<M, T>: Send + Sync {
    /// [`Stack::call`].
    fn call(&self, call: Call<M>) -> BoxFuture<'_, Result<T, Failed>>;
}

impl<S, M, T> Calls<M, T> for Stack<S>
where
    S: Service<Request<M>, Response = Response<T>, Error = Status> + Clone + Send + Sync,
    S::Future: Send,
    M: Clone + Send + Sync + 'static,
    T: Send + 'static,
{
    fn call(&self, call: Call<M>) -> BoxFuture<'_, Result<T, Failed>> {
        Box::pin(Stack::call(self, call))
    }
}

/// Wraps the tonic call `rpc` (named `rpc_name`, e.g.
/// `downstream.orders.v1.OrdersService/ListOrders`) of `component`'s
/// downstream in its resilience stack.
pub fn build<M, T, S>(
    component: Component,
    rpc_name: &'static str,
    settings: &DownstreamSettings,
    metrics: &Arc<Metrics>,
    rpc: S,
) -> Arc<dyn Calls<M, T>>
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
    Arc::new(Stack {
        bulkhead: BulkheadLayer::new(settings.max_concurrency, m.clone()),
        retry: RetryLayer::new(settings.retry.clone(), budget.clone(), m.clone()),
        hedge: HedgeLayer::new(settings.hedge.clone(), budget, m.clone()),
        breaker: Arc::new(Breaker::with_metrics(settings.breaker.clone(), m.clone())),
        attempt: AttemptLayer::new(settings.timeout, component, rpc_name, m),
        rpc,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::Config, deadline::Deadline};

    /// Every downstream call in flight holds its stack's future (boxed once
    /// per call): what the steps add to the tonic call's own future is
    /// memory per call. Today under 1 KiB; a step that keeps its inner
    /// future twice (an `async fn` taking a future and awaiting it) adds
    /// that future again and fails this.
    #[tokio::test]
    async fn the_steps_add_little_to_the_rpc_future() {
        let config = Config::parse(crate::config::EXAMPLE).expect("example");
        let settings = config.downstream(Component::Profile).expect("profile");
        // A call whose future is as large as a tonic client's was (1.3 KiB).
        let rpc = tower::service_fn(|r: Request<u8>| async move {
            let pad = [0u8; 1336];
            tokio::task::yield_now().await;
            std::hint::black_box(&pad);
            Ok::<_, Status>(Response::new(r.into_inner()))
        });
        let stack = build(
            Component::Profile,
            "p",
            settings,
            &Arc::new(Metrics::new()),
            rpc,
        );
        let deadline = Deadline::from_metadata(
            &Default::default(),
            &config.deadlines,
            tokio::time::Instant::now(),
        );
        let alone = std::mem::size_of_val(&rpc.oneshot(Request::new(1u8)));
        let whole = std::mem::size_of_val(&*stack.call(Call::new(1u8, deadline)));
        assert!(
            whole <= alone + 1280,
            "stack future {whole} bytes over an rpc future of {alone}"
        );
    }
}
