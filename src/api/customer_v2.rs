//! `bfb.customer.v2.CustomerAggregateService`: the v2 adapter over the same
//! engine as v1. Same downstream calls and cache entries; only the shape
//! differs: exact money, per-status and per-currency summaries, a rating
//! histogram, and page tokens.

use std::{collections::BTreeMap, sync::Arc};

use tonic::{Request, Response, Status};
use tonic_types::FieldViolation;

use crate::{
    component::Component,
    engine::{CustomerParts, Engine},
    pb::{
        bfb::customer::v2::{
            BatchGetCustomersRequest, BatchGetCustomersResponse, CurrencyTotal, Customer,
            CustomerResult, Favorite, Favorites, GetCustomerRequest, GetCustomerResponse, Money,
            Order, OrderStatus, Orders, PageRequest, Profile, Review, Reviews, StatusCount,
            customer_aggregate_service_server::CustomerAggregateService,
        },
        downstream::{self, orders::v1::OrderStatus as DownstreamStatus},
    },
};

use super::{Rpc, aggregate_status, batch_results, fetch_customer, fetch_customers, handle};

/// How many recent reviews v2 returns.
const RECENT: usize = 10;
/// Page size when the caller gives none.
const DEFAULT_PAGE: usize = 10;
/// Largest page size.
const MAX_PAGE: usize = 100;

/// The v2 customer service.
pub struct CustomerV2 {
    engine: Arc<Engine>,
}

impl CustomerV2 {
    /// A v2 adapter over `engine`.
    pub fn new(engine: Arc<Engine>) -> CustomerV2 {
        CustomerV2 { engine }
    }
}

// Handlers written out rather than `async fn`: see `super::Boxed`.
#[tonic::async_trait]
impl CustomerAggregateService for CustomerV2 {
    fn get_customer<'s, 'f>(
        &'s self,
        request: Request<GetCustomerRequest>,
    ) -> super::Boxed<'f, GetCustomerResponse>
    where
        's: 'f,
    {
        Box::pin(handle(
            &self.engine,
            "v2.GetCustomer",
            request,
            |req, call| self.get_customer(req, call),
        ))
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
            "v2.BatchGetCustomers",
            request,
            |req, call| self.batch_get_customers(req, call),
        ))
    }
}

impl CustomerV2 {
    async fn get_customer(
        &self,
        req: GetCustomerRequest,
        call: Rpc,
    ) -> Result<Response<GetCustomerResponse>, Status> {
        // The pages first: their problems join the common ones.
        let mut violations = Vec::new();
        let id = &req.customer_id;
        let favorites_page = Page::check(
            ("favorites_page", id),
            req.favorites_page.as_ref(),
            &mut violations,
        );
        let orders_page = Page::check(
            ("orders_page", id),
            req.orders_page.as_ref(),
            &mut violations,
        );
        let parts = fetch_customer(
            &self.engine,
            &call,
            id,
            req.read_mask.as_ref(),
            (req.completeness, req.cache.as_ref()),
            violations,
        )
        .await?;
        Ok(Response::new(shape(
            req.customer_id,
            parts,
            favorites_page,
            orders_page,
        )))
    }
}

impl CustomerV2 {
    async fn batch_get_customers(
        &self,
        req: BatchGetCustomersRequest,
        call: Rpc,
    ) -> Result<Response<BatchGetCustomersResponse>, Status> {
        // The first page of each list, of page_size items.
        let mut violations = Vec::new();
        let size_ok = usize::try_from(req.page_size).is_ok_and(|n| n <= MAX_PAGE);
        if !size_ok {
            violations.push(FieldViolation::new(
                "page_size",
                format!("must be between 1 and {MAX_PAGE} (0 means {DEFAULT_PAGE})"),
            ));
        }
        let first = PageRequest {
            page_size: if size_ok { req.page_size } else { 0 },
            page_token: String::new(),
        };
        // Bound to each customer when its answer is shaped.
        let favorites_page = Page::check(("favorites_page", ""), Some(&first), &mut violations);
        let orders_page = Page::check(("orders_page", ""), Some(&first), &mut violations);
        let answers = fetch_customers(
            &self.engine,
            &call,
            &req.customer_ids,
            req.read_mask.as_ref(),
            (req.completeness, req.cache.as_ref()),
            violations,
        )
        .await?;
        let results = batch_results(
            req.customer_ids,
            answers,
            |customer_id, parts| {
                let r = shape(
                    customer_id.clone(),
                    parts,
                    favorites_page.of(&customer_id),
                    orders_page.of(&customer_id),
                );
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

/// A checked page request: where to start and how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Page {
    offset: usize,
    size: usize,
    /// Which list the token belongs to (tokens are not interchangeable).
    list: &'static str,
    /// Binds tokens to the list of one entity: [`page_key`].
    key: u64,
}

impl Page {
    /// Checks the page request of list `field` (e.g. `orders_page`) of
    /// entity `id`.
    fn check(
        (field, id): (&'static str, &str),
        req: Option<&PageRequest>,
        v: &mut Vec<FieldViolation>,
    ) -> Page {
        let list = field.trim_end_matches("_page");
        let mut page = Page {
            offset: 0,
            size: DEFAULT_PAGE,
            list,
            key: page_key(list, id),
        };
        let Some(req) = req else {
            return page;
        };
        match usize::try_from(req.page_size) {
            Ok(0) => {}
            Ok(n) if n <= MAX_PAGE => page.size = n,
            _ => v.push(FieldViolation::new(
                format!("{field}.page_size"),
                format!("must be between 1 and {MAX_PAGE} (0 means {DEFAULT_PAGE})"),
            )),
        }
        if !req.page_token.is_empty() {
            match decode_token(&req.page_token, page.key) {
                Some(offset) => page.offset = offset,
                None => v.push(FieldViolation::new(
                    format!("{field}.page_token"),
                    "not a page token of this list of this customer; pass next_page_token \
                     from the previous page",
                )),
            }
        }
        page
    }

    /// The same page of entity `id`'s list.
    fn of(self, id: &str) -> Page {
        Page {
            key: page_key(self.list, id),
            ..self
        }
    }

    /// This page of `items`, the next page's token, and the total.
    fn apply<T>(self, items: Vec<T>) -> (Vec<T>, String, i32) {
        let total = items.len();
        let end = self.offset.saturating_add(self.size).min(total);
        let next = if end < total {
            encode_token(self.key, end)
        } else {
            String::new()
        };
        let page = items
            .into_iter()
            .skip(self.offset)
            .take(self.size)
            .collect();
        (page, next, count(total))
    }
}

/// Page tokens are opaque to callers: the hex of a version byte, the offset
/// and a 64-bit tag over (list, entity id, offset). The tag is a check, not a
/// secret: an edited token, or one from another list or another customer,
/// fails it and is INVALID_ARGUMENT; every replica computes the same tag, so
/// a token works on any of them. (FNV-1a, written out here because it is
/// eight lines and must never change between builds, which std's hasher
/// does not promise.)
const TOKEN_VERSION: u8 = 1;

fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn page_key(list: &str, id: &str) -> u64 {
    let h = fnv1a(0xcbf2_9ce4_8422_2325, b"bfb.page\0");
    let h = fnv1a(h, list.as_bytes());
    fnv1a(fnv1a(h, b"\0"), id.as_bytes())
}

fn encode_token(key: u64, offset: usize) -> String {
    let offset = u32::try_from(offset).unwrap_or(u32::MAX);
    let tag = fnv1a(key, &offset.to_be_bytes());
    let mut bytes = vec![TOKEN_VERSION];
    bytes.extend_from_slice(&offset.to_be_bytes());
    bytes.extend_from_slice(&tag.to_be_bytes());
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str, key: u64) -> Option<usize> {
    if token.len() != 26 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..token.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(token.get(i..i + 2)?, 16).ok())
        .collect();
    let bytes = bytes?;
    let (version, rest) = bytes.split_first()?;
    let offset: [u8; 4] = rest.get(..4)?.try_into().ok()?;
    let tag: [u8; 8] = rest.get(4..)?.try_into().ok()?;
    (*version == TOKEN_VERSION && fnv1a(key, &offset) == u64::from_be_bytes(tag))
        .then(|| usize::try_from(u32::from_be_bytes(offset)).ok())
        .flatten()
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn shape(
    customer_id: String,
    parts: CustomerParts,
    favorites_page: Page,
    orders_page: Page,
) -> GetCustomerResponse {
    let status = aggregate_status(&[
        (Component::Profile, parts.profile.state()),
        (Component::Favorites, parts.favorites.state()),
        (Component::Reviews, parts.reviews.state()),
        (Component::Orders, parts.orders.state()),
    ]);
    let customer = Customer {
        customer_id,
        profile: parts.profile.ok().map(|p| Profile {
            display_name: p.display_name,
            email: p.email,
            tier: p.tier,
            country_code: p.country_code,
            created_at: p.created_at,
        }),
        favorites: parts.favorites.ok().map(|all| {
            let (items, next_page_token, total_count) = favorites_page.apply(all);
            Favorites {
                items: items
                    .into_iter()
                    .map(|f| Favorite {
                        product_id: f.product_id,
                        product_name: f.product_name,
                        added_at: f.added_at,
                    })
                    .collect(),
                next_page_token,
                total_count,
            }
        }),
        reviews: parts.reviews.ok().map(reviews),
        orders: parts.orders.ok().map(|all| orders(all, orders_page)),
    };
    GetCustomerResponse {
        customer: Some(customer),
        status: Some(status),
    }
}

fn reviews(all: Vec<downstream::reviews::v1::Review>) -> Reviews {
    let mut histogram = vec![0; 5];
    for r in &all {
        if let Some(slot) = usize::try_from(r.rating - 1)
            .ok()
            .and_then(|i| histogram.get_mut(i))
        {
            *slot += 1;
        }
    }
    Reviews {
        count: count(all.len()),
        rating_histogram: histogram,
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
    }
}

fn status(value: i32) -> OrderStatus {
    match DownstreamStatus::try_from(value).unwrap_or(DownstreamStatus::Unspecified) {
        DownstreamStatus::Unspecified => OrderStatus::Unspecified,
        DownstreamStatus::Placed => OrderStatus::Placed,
        DownstreamStatus::Shipped => OrderStatus::Shipped,
        DownstreamStatus::Delivered => OrderStatus::Delivered,
        DownstreamStatus::Cancelled => OrderStatus::Cancelled,
    }
}

fn orders(all: Vec<downstream::orders::v1::Order>, page: Page) -> Orders {
    let mut by_status: BTreeMap<i32, i32> = BTreeMap::new();
    let mut by_currency: BTreeMap<String, (i64, i32)> = BTreeMap::new();
    for o in &all {
        *by_status.entry(status(o.status) as i32).or_default() += 1;
        let e = by_currency.entry(o.currency_code.clone()).or_default();
        e.0 = e.0.saturating_add(o.total_minor);
        e.1 += 1;
    }
    let (items, next_page_token, total_count) = page.apply(all);
    Orders {
        items: items
            .into_iter()
            .map(|o| Order {
                status: status(o.status).into(),
                total: Some(Money {
                    currency_code: o.currency_code,
                    minor_units: o.total_minor,
                }),
                order_id: o.order_id,
                placed_at: o.placed_at,
            })
            .collect(),
        next_page_token,
        total_count,
        by_status: by_status
            .into_iter()
            .map(|(status, count)| StatusCount { status, count })
            .collect(),
        by_currency: by_currency
            .into_iter()
            .map(|(currency_code, (minor_units, count))| CurrencyTotal {
                total: Some(Money {
                    currency_code,
                    minor_units,
                }),
                count,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_walk_a_list_and_belong_to_it() {
        let page = Page::check(("orders_page", "c-1"), None, &mut Vec::new());
        let page = Page { size: 4, ..page };
        let (items, next, total) = page.apply((0..10).collect::<Vec<_>>());
        assert_eq!((items, total), (vec![0, 1, 2, 3], 10));
        assert_eq!(decode_token(&next, page_key("orders", "c-1")), Some(4));
        assert_eq!(
            decode_token(&next, page_key("favorites", "c-1")),
            None,
            "not interchangeable between lists"
        );
        assert_eq!(
            decode_token(&next, page_key("orders", "c-2")),
            None,
            "nor between customers"
        );
        assert!(
            !next.contains(
                &"orders"
                    .bytes()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            )
        );
        let mut edited = next.clone().into_bytes();
        edited[8] = if edited[8] == b'0' { b'1' } else { b'0' };
        let edited = String::from_utf8(edited).expect("hex");
        assert_eq!(
            decode_token(&edited, page_key("orders", "c-1")),
            None,
            "edited"
        );
        let (items, next, _) = Page { offset: 8, ..page }.apply((0..10).collect::<Vec<_>>());
        assert_eq!((items, next.as_str()), (vec![8, 9], ""));
        for bad in ["zz", "abc", "6f", &"0".repeat(26), &"0".repeat(80)] {
            assert_eq!(decode_token(bad, page.key), None, "{bad}");
        }
    }

    #[test]
    fn page_sizes_are_checked() {
        let mut v = Vec::new();
        let req = |size, token: &str| PageRequest {
            page_size: size,
            page_token: token.into(),
        };
        assert_eq!(
            Page::check(("orders_page", "c-1"), Some(&req(0, "")), &mut v).size,
            DEFAULT_PAGE
        );
        Page::check(("orders_page", "c-1"), Some(&req(101, "")), &mut v);
        Page::check(("orders_page", "c-1"), Some(&req(-1, "nope")), &mut v);
        let fields: Vec<_> = v.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "orders_page.page_size",
                "orders_page.page_size",
                "orders_page.page_token"
            ]
        );
    }

    #[test]
    fn money_is_exact_and_never_mixed_across_currencies() {
        use downstream::orders::v1 as d;
        let order = |minor, cur: &str, s: d::OrderStatus| d::Order {
            total_minor: minor,
            currency_code: cur.into(),
            status: s as i32,
            ..Default::default()
        };
        let o = orders(
            vec![
                order(1999, "EUR", d::OrderStatus::Shipped),
                order(1, "EUR", d::OrderStatus::Shipped),
                order(500, "JPY", d::OrderStatus::Cancelled),
            ],
            Page {
                size: 10,
                ..Page::check(("orders_page", "c-1"), None, &mut Vec::new())
            },
        );
        let totals: Vec<(String, i64, i32)> = o
            .by_currency
            .iter()
            .map(|c| {
                let m = c.total.as_ref().expect("money");
                (m.currency_code.clone(), m.minor_units, c.count)
            })
            .collect();
        assert_eq!(
            totals,
            [("EUR".to_string(), 2000, 2), ("JPY".to_string(), 500, 1)]
        );
        let by_status: Vec<(i32, i32)> = o.by_status.iter().map(|s| (s.status, s.count)).collect();
        assert_eq!(
            by_status,
            [
                (OrderStatus::Shipped as i32, 2),
                (OrderStatus::Cancelled as i32, 1)
            ]
        );
    }
}
