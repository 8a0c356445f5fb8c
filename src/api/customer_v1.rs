//! `bfb.customer.v1.CustomerAggregateService`: the v1 adapter over the engine.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    component::Component,
    engine::{CustomerParts, Engine},
    pb::{
        bfb::customer::v1::{
            BatchGetCustomersRequest, BatchGetCustomersResponse, Customer, CustomerResult,
            Favorite, Favorites, GetCustomerRequest, GetCustomerResponse, Order, OrderTotals,
            Orders, Profile, Review, ReviewSummary, Reviews,
            customer_aggregate_service_server::CustomerAggregateService,
        },
        downstream::{self, orders::v1::OrderStatus},
    },
};

use super::{Rpc, aggregate_status, batch_results, fetch_customer, fetch_customers, handle};

/// How many recent reviews and orders v1 returns.
const RECENT: usize = 10;

/// The v1 customer service.
pub struct CustomerV1 {
    engine: Arc<Engine>,
}

impl CustomerV1 {
    /// A v1 adapter over `engine`.
    pub fn new(engine: Arc<Engine>) -> CustomerV1 {
        CustomerV1 { engine }
    }
}

// Handlers written out rather than `async fn`: see `super::Boxed`.
#[tonic::async_trait]
impl CustomerAggregateService for CustomerV1 {
    fn get_customer<'s, 'f>(
        &'s self,
        request: Request<GetCustomerRequest>,
    ) -> super::Boxed<'f, GetCustomerResponse>
    where
        's: 'f,
    {
        Box::pin(handle(&self.engine, "GetCustomer", request, |req, call| {
            self.get_customer(req, call)
        }))
    }

    fn batch_get_customers<'s, 'f>(
        &'s self,
        request: Request<BatchGetCustomersRequest>,
    ) -> super::Boxed<'f, BatchGetCustomersResponse>
    where
        's: 'f,
    {
        Box::pin(handle(
            &self.engine,
            "BatchGetCustomers",
            request,
            |req, call| self.batch_get_customers(req, call),
        ))
    }
}

impl CustomerV1 {
    async fn get_customer(
        &self,
        req: GetCustomerRequest,
        call: Rpc,
    ) -> Result<Response<GetCustomerResponse>, Status> {
        let parts = fetch_customer(
            &self.engine,
            &call,
            &req.customer_id,
            req.read_mask.as_ref(),
            (req.completeness, req.cache.as_ref()),
            Vec::new(),
        )
        .await?;
        Ok(Response::new(shape(req.customer_id, parts)))
    }
}

impl CustomerV1 {
    async fn batch_get_customers(
        &self,
        req: BatchGetCustomersRequest,
        call: Rpc,
    ) -> Result<Response<BatchGetCustomersResponse>, Status> {
        let answers = fetch_customers(
            &self.engine,
            &call,
            &req.customer_ids,
            req.read_mask.as_ref(),
            (req.completeness, req.cache.as_ref()),
            Vec::new(),
        )
        .await?;
        let results = batch_results(
            req.customer_ids,
            answers,
            |customer_id, parts| {
                let r = shape(customer_id.clone(), parts);
                CustomerResult {
                    customer_id,
                    customer: r.customer,
                    status: r.status,
                    error: None,
                }
            },
            |customer_id, error| CustomerResult {
                customer_id,
                error: Some(error),
                ..Default::default()
            },
        );
        Ok(Response::new(BatchGetCustomersResponse { results }))
    }
}

/// Shapes the engine's parts into the v1 response.
fn shape(customer_id: String, parts: CustomerParts) -> GetCustomerResponse {
    let status = aggregate_status(&[
        (Component::Profile, parts.profile.state()),
        (Component::Favorites, parts.favorites.state()),
        (Component::Reviews, parts.reviews.state()),
        (Component::Orders, parts.orders.state()),
    ]);
    let customer = Customer {
        customer_id,
        profile: parts.profile.ok().map(profile),
        favorites: parts.favorites.ok().map(favorites),
        reviews: parts.reviews.ok().map(reviews),
        orders: parts.orders.ok().map(orders),
    };
    GetCustomerResponse {
        customer: Some(customer),
        status: Some(status),
    }
}

fn profile(p: downstream::profile::v1::Profile) -> Profile {
    Profile {
        display_name: p.display_name,
        email: p.email,
        tier: p.tier,
        country_code: p.country_code,
        created_at: p.created_at,
    }
}

fn favorites(items: Vec<downstream::favorites::v1::Favorite>) -> Favorites {
    Favorites {
        items: items
            .into_iter()
            .map(|f| Favorite {
                product_id: f.product_id,
                product_name: f.product_name,
                added_at: f.added_at,
            })
            .collect(),
    }
}

fn reviews(all: Vec<downstream::reviews::v1::Review>) -> Reviews {
    let count = all.len();
    let sum: i64 = all.iter().map(|r| i64::from(r.rating)).sum();
    let average_rating = if count == 0 {
        0.0
    } else {
        sum as f64 / count as f64
    };
    Reviews {
        recent: all
            .into_iter()
            .take(RECENT)
            .map(|r| Review {
                review_id: r.review_id,
                product_id: r.product_id,
                rating: r.rating,
                title: r.title,
                created_at: r.created_at,
            })
            .collect(),
        summary: Some(ReviewSummary {
            count: i32::try_from(count).unwrap_or(i32::MAX),
            average_rating,
        }),
    }
}

fn orders(all: Vec<downstream::orders::v1::Order>) -> Orders {
    let count = all.len();
    let currency_code = all
        .first()
        .map(|o| o.currency_code.clone())
        .unwrap_or_default();
    // v1 reports one total in the customer's currency; orders in another
    // currency cannot be added to it and are left out of the sum.
    let total_minor: i64 = all
        .iter()
        .filter(|o| o.currency_code == currency_code)
        .map(|o| o.total_minor)
        .sum();
    let totals = OrderTotals {
        count: i32::try_from(count).unwrap_or(i32::MAX),
        total_spent: major_units(total_minor, &currency_code),
        currency_code,
    };
    Orders {
        recent: all
            .into_iter()
            .take(RECENT)
            .map(|o| Order {
                status: order_status(o.status),
                total: major_units(o.total_minor, &o.currency_code),
                order_id: o.order_id,
                currency_code: o.currency_code,
                placed_at: o.placed_at,
            })
            .collect(),
        totals: Some(totals),
    }
}

/// `PLACED`, `SHIPPED`, ... (v1 carries the state as a string).
fn order_status(value: i32) -> String {
    OrderStatus::try_from(value)
        .unwrap_or(OrderStatus::Unspecified)
        .as_str_name()
        .trim_start_matches("ORDER_STATUS_")
        .to_string()
}

/// Minor units to the floating-point major units v1 reports.
fn major_units(minor: i64, currency: &str) -> f64 {
    // ISO 4217 currencies without minor units; all others the sim uses have two.
    let exponent = if matches!(currency, "JPY" | "KRW" | "ISK") {
        0
    } else {
        2
    };
    minor as f64 / 10f64.powi(exponent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use downstream::{orders::v1 as o, reviews::v1 as r};

    #[test]
    fn reviews_keep_ten_recent_and_summarize_all() {
        let all: Vec<_> = (0..12)
            .map(|i| r::Review {
                review_id: format!("r{i}"),
                rating: if i < 6 { 5 } else { 2 },
                ..Default::default()
            })
            .collect();
        let out = reviews(all);
        assert_eq!(out.recent.len(), 10);
        assert_eq!(out.recent[0].review_id, "r0");
        let s = out.summary.expect("summary");
        assert_eq!(s.count, 12);
        assert!((s.average_rating - 3.5).abs() < 1e-9);
        assert_eq!(
            reviews(vec![]).summary.expect("summary").average_rating,
            0.0
        );
    }

    #[test]
    fn orders_totals_in_major_units() {
        let order = |minor, cur: &str, status: o::OrderStatus| o::Order {
            total_minor: minor,
            currency_code: cur.into(),
            status: status as i32,
            ..Default::default()
        };
        let out = orders(vec![
            order(1050, "EUR", o::OrderStatus::Shipped),
            order(250, "EUR", o::OrderStatus::Placed),
            order(999, "USD", o::OrderStatus::Delivered),
        ]);
        let t = out.totals.expect("totals");
        assert_eq!((t.count, t.currency_code.as_str()), (3, "EUR"));
        assert!((t.total_spent - 13.0).abs() < 1e-9);
        assert_eq!(out.recent[0].status, "SHIPPED");
        assert!((out.recent[0].total - 10.5).abs() < 1e-9);
        assert_eq!(major_units(500, "JPY"), 500.0);
    }
}

#[cfg(test)]
mod future_sizes {
    use super::*;
    use crate::{
        component::ComponentSet,
        config::Config,
        engine::{Ask, Completeness},
        telemetry::metrics::Metrics,
    };

    /// The futures a GetCustomer lives in while it waits for its downstream
    /// calls: every in-flight call holds the handler's future, so its size
    /// is memory per call (docs/performance.md). The limits fail when the
    /// cache's path or the RPC's telemetry are inlined again (21 KiB of
    /// handler future before).
    #[tokio::test]
    async fn request_path_futures_stay_small() {
        // Today 1,648, 1,032 and 16 bytes (3,920, 2,656 and 104 before the
        // handlers, the engine's steps and downstream calls were written as
        // combinators); the limits are allocator size classes.
        let (handler_max, engine_max, call_max) = (2048, 1280, 64);
        let config = Config::parse(crate::config::EXAMPLE).expect("example");
        let engine = Arc::new(Engine::new(&config, &Arc::new(Metrics::new())).expect("engine"));
        let v1 = CustomerV1::new(engine.clone());
        let deadline = engine.deadline(&Default::default(), None);

        let handler = CustomerAggregateService::get_customer(&v1, Request::new(Default::default()));
        let handler = std::mem::size_of_val(&*handler);
        let ask = Ask {
            requested: ComponentSet::of(&Component::CUSTOMER),
            completeness: Completeness::BestEffort,
            policy: Default::default(),
        };
        let aggregate = engine.customer(("scope", "c-1"), ask, deadline, None);
        let aggregate = std::mem::size_of_val(&aggregate);
        let call = engine
            .downstreams()
            .profile
            .call(deadline, Default::default());
        let call = std::mem::size_of_val(&call);
        assert!(
            handler <= handler_max,
            "GetCustomer handler future: {handler} bytes"
        );
        assert!(
            aggregate <= engine_max,
            "engine's customer future: {aggregate} bytes"
        );
        assert!(call <= call_max, "downstream call future: {call} bytes");
    }
}
